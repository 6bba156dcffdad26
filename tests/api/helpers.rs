//! Spawning the real application on port 0 against a fresh database and the fake upstream.

use std::sync::Arc;
use std::time::Duration;

use fusion::app::{Application, Settings, open_store};
use fusion::clock::{SharedClock, SystemClock};
use fusion::config::FileConfig;
use fusion::store::Store;
use fusion::worker::WorkerConfig;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::fake_upstream::FakeUpstream;

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub store: Arc<dyn Store>,
    pub fake: FakeUpstream,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Options for `spawn_app_with`.
pub struct Options {
    /// Run in-process workers (false: API only, jobs stay queued).
    pub workers: bool,
    /// Extra `fusion.toml` text.
    pub toml: String,
    /// The upstream to use instead of the fake (which still starts, unused).
    pub upstream_url: Option<String>,
    /// The workers' fallback poll when no wake-up comes.
    pub poll_interval: Duration,
    /// Wraps the app's store (opened and migrated) before the app is built on it.
    pub wrap_store: Option<StoreWrapper>,
    /// How long a job requeued by a retryable failure waits, doubling per attempt.
    pub retry_base: Duration,
    /// The database to use instead of a new SQLite file (a scratch Postgres database).
    pub database_url: Option<String>,
    /// This host's clock, instead of the system's (one that is off, say).
    pub host_clock: Option<SharedClock>,
}

/// A function from the app's own store to the store it runs on.
pub type StoreWrapper = Box<dyn FnOnce(Arc<dyn Store>) -> Arc<dyn Store>>;

impl Default for Options {
    fn default() -> Self {
        Options {
            workers: true,
            toml: String::new(),
            upstream_url: None,
            poll_interval: Duration::from_millis(50),
            wrap_store: None,
            retry_base: Duration::from_millis(100),
            database_url: None,
            host_clock: None,
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

/// Fast retries so failure tests finish quickly.
const TEST_TOML: &str = r#"
[retry]
base_ms = 10
cap_ms = 50
max_attempts = 3
"#;

/// An app serving the API only: no workers, so submitted jobs stay queued.
pub async fn spawn_api_only() -> TestApp {
    spawn_app_with(Options {
        workers: false,
        ..Options::default()
    })
    .await
}

pub async fn spawn_app_with(opts: Options) -> TestApp {
    try_spawn_app_with(opts).await.unwrap()
}

/// `spawn_app_with`, or the error the application's build failed with.
pub async fn try_spawn_app_with(opts: Options) -> anyhow::Result<TestApp> {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!("{TEST_TOML}\n{}", opts.toml);
    let file: FileConfig = toml::from_str(&toml).expect("test config");
    let fake_url = opts.upstream_url.unwrap_or_else(|| fake.base_url());
    let fusion = file
        .resolve(&|k| (k == "FUSION_UPSTREAM_URL").then(|| fake_url.clone()))
        .unwrap();
    let settings = Settings {
        database_url: opts
            .database_url
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("fusion.db").display())),
        store: Default::default(),
        listen: Some("127.0.0.1:0".into()),
        fusion,
        worker: opts.workers.then(|| WorkerConfig {
            concurrency: 8,
            lease: Duration::from_secs(5),
            poll_interval: opts.poll_interval,
            shutdown_grace: Duration::from_secs(1),
            retry_base: opts.retry_base,
            ..WorkerConfig::default()
        }),
    };
    let store = open_store(&settings.database_url, settings.store)
        .await
        .unwrap();
    let store = match opts.wrap_store {
        Some(wrap) => wrap(store),
        None => store,
    };
    let host_clock = opts.host_clock.unwrap_or_else(|| Arc::new(SystemClock));
    let app = Application::build_on(settings, store, host_clock).await?;
    let address = format!("http://127.0.0.1:{}", app.port().unwrap());
    let store = app.store();
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run(shutdown.clone()));
    Ok(TestApp {
        address,
        client: reqwest::Client::new(),
        store,
        fake,
        shutdown,
        _dir: dir,
    })
}

pub fn body_with_panel(panel: &[&str], analyst: &str) -> Value {
    json!({
        "model": "fusion",
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "plugins": [{"id": "fusion", "model": analyst, "analysis_models": panel}],
    })
}

/// A request to the model `outer`, offered the fusion tool with this panel and analyst (script
/// `outer` to call it).
pub fn body_with_tool(panel: &[&str], analyst: &str) -> Value {
    json!({
        "model": "outer",
        "messages": [{"role": "user", "content": "Ask the panel."}],
        "tools": [{"type": "fusion", "fusion": {"analysis_models": panel, "model": analyst}}],
    })
}

impl TestApp {
    pub async fn submit(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/jobs", self.address))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Submit and return the job id, asserting 202.
    pub async fn submit_ok(&self, body: &Value) -> String {
        let resp = self.submit(body).await;
        assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
        let job: Value = resp.json().await.unwrap();
        job["id"].as_str().unwrap().to_string()
    }

    pub async fn get_job(&self, id: &str) -> Value {
        let resp = self.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    /// `GET /v1/jobs?{query}`: a page of the job list.
    pub async fn list_jobs(&self, query: &str) -> Value {
        let resp = self.get(&format!("/v1/jobs?{query}")).await;
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    /// Poll until the job is in a final state (or panic after `secs`).
    pub async fn wait_final(&self, id: &str, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let job = self.get_job(id).await;
            if matches!(
                job["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} not final after {secs}s: {job:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn post(&self, path: &str) -> reqwest::Response {
        self.bare(reqwest::Method::POST, path).await
    }

    /// `GET {path}`, whatever it answers.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.bare(reqwest::Method::GET, path).await
    }

    /// `{method} {path}` with no body.
    async fn bare(&self, method: reqwest::Method, path: &str) -> reqwest::Response {
        let url = format!("{}{path}", self.address);
        self.client.request(method, url).send().await.unwrap()
    }
}

/// Poll `done` every 20 ms until it holds; after 30 s, fail saying `what` was awaited: a test
/// waiting on something that never comes fails rather than hangs the suite.
pub async fn until(what: &str, done: impl AsyncFnMut() -> bool) {
    until_within(what, Duration::from_secs(30), done).await
}

/// `until`, failing once `within` has passed: for what must come that soon.
pub async fn until_within(what: &str, within: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {within:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A finished job's tokens, the same in its `usage` and in its result's (an OpenAI
/// `chat.completion`'s): `prompt`, `completion`, and their sum.
pub fn assert_tokens(job: &Value, prompt: i64, completion: i64) {
    for usage in [&job["usage"], &job["result"]["usage"]] {
        assert_usage(usage, prompt, completion);
    }
}

/// A `usage` object (a job's, a step's): `prompt` and `completion` tokens, and their sum.
pub fn assert_usage(usage: &Value, prompt: i64, completion: i64) {
    assert_eq!(usage["prompt_tokens"], prompt, "{usage}");
    assert_eq!(usage["completion_tokens"], completion, "{usage}");
    assert_eq!(usage["total_tokens"], prompt + completion, "{usage}");
}
