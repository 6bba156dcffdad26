//! Crash recovery with the real binary: SIGKILL the server while the analysis call hangs, start
//! it again on the same SQLite file, and the job finishes without calling any panel model twice.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::checkpoints::{Checked, check_no_step_repeated, record_step_writes};
use crate::fake_upstream::{FakeUpstream, Kind, Reply};
use crate::helpers::{body_with_panel, body_with_tool, until};

/// A `fusion serve` child process; killed with SIGKILL on drop.
pub struct Server {
    child: Child,
    pub address: String,
}

impl Server {
    pub async fn start(db: &Path, upstream: &str, port: u16) -> Server {
        Server::start_with(db, upstream, port, &[]).await
    }

    pub async fn start_with(db: &Path, upstream: &str, port: u16, env: &[(&str, &str)]) -> Server {
        let url = format!("sqlite://{}", db.display());
        Server::spawn("serve", &url, upstream, port, env).await
    }

    /// Run `fusion <command>`; for `serve`, wait until it is ready.
    pub async fn spawn(
        command: &str,
        database_url: &str,
        upstream: &str,
        port: u16,
        env: &[(&str, &str)],
    ) -> Server {
        let child = Command::new(env!("CARGO_BIN_EXE_fusion"))
            .arg(command)
            .env("DATABASE_URL", database_url)
            .env("FUSION_LISTEN", format!("127.0.0.1:{port}"))
            .env("FUSION_UPSTREAM_URL", upstream)
            .env("FUSION_LEASE_SECONDS", "2")
            .env("FUSION_POLL_MS", "100")
            .env("FUSION_CONCURRENCY", "32")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("run target/debug/fusion");
        let address = format!("http://127.0.0.1:{port}");
        if command != "serve" {
            return Server { child, address };
        }
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = client.get(format!("{address}/readyz")).send().await
                && r.status() == 200
            {
                return Server { child, address };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("fusion serve did not become ready on port {port}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// SIGTERM, then wait for the process to exit by itself.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        self.send_term();
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("fusion did not exit after SIGTERM")
            .unwrap()
    }

    /// Send SIGTERM, and go on.
    pub fn send_term(&self) {
        let pid = self.pid().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// SIGKILL: no shutdown code runs, leases are left behind.
    pub async fn kill(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

/// Submit `n` jobs whose models are unique per job (`{prefix}{n}-a`, …), so the fake's counts
/// are per step.
pub async fn submit_unique_jobs(
    client: &reqwest::Client,
    server: &Server,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let panel = ["a", "b", "c"].map(|m| format!("{prefix}{i}-{m}"));
        let panel: Vec<&str> = panel.iter().map(String::as_str).collect();
        let resp = client
            .post(format!("{}/v1/jobs", server.address))
            .json(&body_with_panel(&panel, &format!("{prefix}{i}-judge")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let job: Value = resp.json().await.unwrap();
        ids.push(job["id"].as_str().unwrap().to_string());
    }
    ids
}

/// Poll until the job succeeded; panics if it fails or takes longer than `secs`.
pub async fn wait_succeeded(
    client: &reqwest::Client,
    server: &Server,
    id: &str,
    secs: u64,
) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let job = get_job(client, server, id).await;
        if job["status"] == "succeeded" {
            return job;
        }
        assert_ne!(job["status"], "failed", "{job:#}");
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} not done: {job:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub async fn get_job(client: &reqwest::Client, server: &Server, id: &str) -> Value {
    client
        .get(format!("{}/v1/jobs/{id}", server.address))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A server on a fresh SQLite file whose analyst hangs, with one job submitted and waiting on
/// its analysis call (so every panel answer is checkpointed).
struct HangingAnalysis {
    fake: FakeUpstream,
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    port: u16,
    client: reqwest::Client,
    server: Server,
    id: String,
}

impl HangingAnalysis {
    async fn start(panel: &[&str], env: &[(&str, &str)]) -> HangingAnalysis {
        let fake = FakeUpstream::start().await;
        fake.script("judge", Kind::Analysis, vec![Reply::Hang]);
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("fusion.db");
        let port = free_port();
        let client = reqwest::Client::new();
        let server = Server::start_with(&db, &fake.base_url(), port, env).await;
        let resp = client
            .post(format!("{}/v1/jobs", server.address))
            .json(&body_with_panel(panel, "judge"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
        let job: Value = resp.json().await.unwrap();
        let id = job["id"].as_str().unwrap().to_string();
        for i in 0.. {
            if fake.calls("judge", Kind::Analysis) == 1 {
                break;
            }
            assert!(i < 500, "analysis never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The analysis call starts as soon as the panel has answered, not once its answers
        // are on disk (their checkpoints go on meanwhile): wait for those too. Asserting them
        // at once failed when a checkpoint batch was slower than the analysis call's start.
        let url = format!("{}/v1/jobs/{id}", server.address);
        for i in 0.. {
            let job: Value = client.get(&url).send().await.unwrap().json().await.unwrap();
            let panel = job["panel"].as_array().unwrap();
            if panel.iter().all(|p| p["status"] == "succeeded") {
                break;
            }
            assert!(
                i < 500,
                "the panel's answers were never all checkpointed: {job:#}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        HangingAnalysis {
            fake,
            _dir: dir,
            db,
            port,
            client,
            server,
            id,
        }
    }
}

#[tokio::test]
async fn a_killed_server_resumes_the_job_from_its_checkpoints() {
    let HangingAnalysis {
        fake,
        _dir,
        db,
        port,
        client,
        server,
        id,
    } = HangingAnalysis::start(&["m1", "m2", "m3"], &[]).await;
    let job = get_job(&client, &server, &id).await;
    let panel = job["panel"].as_array().unwrap();
    assert!(panel.iter().all(|p| p["status"] == "succeeded"), "{job:#}");
    server.kill().await;

    fake.script("judge", Kind::Analysis, vec![Reply::Ok]);
    let server = Server::start(&db, &fake.base_url(), port).await;
    let job = wait_succeeded(&client, &server, &id, 10).await;
    assert_eq!(
        job["attempt"], 2,
        "resumed by a second claim after the lease expired"
    );
    for m in ["m1", "m2", "m3"] {
        assert_eq!(
            fake.calls(m, Kind::Panel),
            1,
            "panel model {m} was called again"
        );
    }
    assert_eq!(
        fake.calls("judge", Kind::Analysis),
        2,
        "the in-flight analysis call repeats"
    );
    assert_eq!(fake.calls("judge", Kind::Final), 1);
    server.kill().await;
}

#[tokio::test]
async fn sigterm_hands_running_jobs_back_at_once() {
    // A long lease: only a release (not expiry) can free the job quickly.
    let env = [
        ("FUSION_LEASE_SECONDS", "60"),
        ("FUSION_SHUTDOWN_GRACE_SECONDS", "1"),
    ];
    let HangingAnalysis {
        fake,
        _dir,
        db,
        port,
        client,
        server,
        id,
    } = HangingAnalysis::start(&["m1", "m2"], &env).await;
    let status = server.terminate().await;
    assert!(status.success(), "fusion exited with {status}");

    fake.script("judge", Kind::Analysis, vec![Reply::Ok]);
    let started = std::time::Instant::now();
    let server = Server::start_with(&db, &fake.base_url(), port, &env).await;
    let job = wait_succeeded(&client, &server, &id, 10).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the job waited for its 60 s lease instead of being released"
    );
    // A released attempt does not count against `max_attempts` (the contract tests check
    // that), but its number is not given back: the next lease is attempt 2.
    assert_eq!(job["attempt"], 2);
    assert_eq!(fake.calls("m1", Kind::Panel), 1);
    assert_eq!(fake.calls("m2", Kind::Panel), 1);
    server.kill().await;
}

#[tokio::test]
async fn sigterm_answers_a_client_waiting_on_a_job_it_hands_back() {
    let env = [
        ("FUSION_LEASE_SECONDS", "60"),
        ("FUSION_SHUTDOWN_GRACE_SECONDS", "1"),
    ];
    let HangingAnalysis {
        fake,
        _dir,
        client,
        server,
        ..
    } = HangingAnalysis::start(&["m1", "m2"], &env).await;
    // A synchronous chat completion, a streamed one and the fusion tool's, each on a job whose
    // analysis hangs.
    let waiting = |body: Value| {
        let client = client.clone();
        let url = format!("{}/v1/chat/completions", server.address);
        tokio::spawn(async move {
            let resp = client.post(url).json(&body).send().await.unwrap();
            let status = resp.status();
            let retry = resp.headers().get("x-should-retry").cloned();
            let job = resp.headers().get("x-fusion-job-id").cloned();
            (status, job, retry, resp.text().await.unwrap())
        })
    };
    let mut streamed = body_with_panel(&["m1", "m2"], "judge");
    streamed["stream"] = true.into();
    fake.script(
        "outer",
        Kind::Panel,
        vec![Reply::ToolCall("fusion".into(), json!({"prompt": "Why?"}))],
    );
    let sync = waiting(body_with_panel(&["m1", "m2"], "judge"));
    let streamed = waiting(streamed);
    let tool = waiting(body_with_tool(&["m1", "m2"], "judge"));
    until("the four analysis calls", async || {
        fake.calls("judge", Kind::Analysis) >= 4
    })
    .await;

    let status = server.terminate().await;
    assert!(status.success(), "fusion exited with {status}");
    for waited in [sync, tool] {
        let (status, job, retry, body) = waited.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(job.is_some(), "the answer names its job: {body}");
        // The OpenAI SDKs retry a 503 by default: a retry would be a new POST, a new paid job.
        assert_eq!(
            retry.as_ref().map(|v| v.to_str().unwrap()),
            Some("false"),
            "{body}"
        );
        let error: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["error"]["code"], "shutting_down", "{body}");
    }
    let (status, _, _, body) = streamed.await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("shutting_down"), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
}

// SIGTERM while a client's request is relayed to a model that never answers (the gateway allows a
// relayed answer up to a day): the process still exits soon after handing its jobs back, the
// request cut. Before, graceful shutdown waited on that request without end.
#[tokio::test]
async fn sigterm_does_not_wait_on_a_relayed_answer_that_never_ends() {
    let fake = FakeUpstream::start().await;
    fake.script("plain", Kind::Panel, vec![Reply::Hang]);
    let dir = tempfile::tempdir().unwrap();
    let env = [("FUSION_SHUTDOWN_GRACE_SECONDS", "1")];
    let server = Server::start_with(
        &dir.path().join("fusion.db"),
        &fake.base_url(),
        free_port(),
        &env,
    )
    .await;
    let url = format!("{}/v1/chat/completions", server.address);
    let body = json!({"model": "plain", "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]});
    let relayed =
        tokio::spawn(async move { reqwest::Client::new().post(url).json(&body).send().await });
    until("the relayed call", async || {
        fake.calls("plain", Kind::Panel) >= 1
    })
    .await;
    let started = std::time::Instant::now();
    let status = server.terminate().await;
    assert!(status.success(), "fusion exited with {status}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(
        relayed.await.unwrap().is_err(),
        "the relayed request was cut"
    );
}

// `--help` names the environment variables each flag falls back to, not their values: the
// database URL's holds its password. Before, `fusion --help` printed it.
#[test]
fn help_shows_no_database_password() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fusion"))
        .args(["serve", "--help"])
        .env(
            "DATABASE_URL",
            "postgres://fusion:hunter2@db.example/fusion",
        )
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("DATABASE_URL"), "{help}");
    assert!(!help.contains("hunter2"), "{help}");
}

/// 200 jobs on a slow upstream, the server SIGKILLed at random moments and restarted: every job
/// succeeds, and no step is called again once its checkpoint was written.
#[tokio::test]
async fn repeated_sigkills_lose_no_job_and_repeat_no_finished_step() {
    const JOBS: usize = 200;
    const KILLS: usize = 4;
    let fake = FakeUpstream::start().await;
    fake.set_default(Reply::Delay(100, Box::new(Reply::Ok)));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fusion.db");
    let port = free_port();
    let client = reqwest::Client::new();
    let seed: u64 = rand::random();
    eprintln!("kill schedule seed: {seed}");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);

    let url = format!("sqlite://{}", db.display());
    record_step_writes(&url).await;
    let mut server = Server::start(&db, &fake.base_url(), port).await;
    let ids = submit_unique_jobs(&client, &server, "j", JOBS).await;
    for _ in 0..KILLS {
        let wait = rand::Rng::random_range(&mut rng, 300..1500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        server.kill().await;
        server = Server::start(&db, &fake.base_url(), port).await;
    }
    for id in &ids {
        wait_succeeded(&client, &server, id, 120).await;
    }
    server.kill().await;

    let Checked { resumed, repeated } = check_no_step_repeated(&url, &ids, &fake).await;
    eprintln!(
        "{JOBS} jobs, {KILLS} kills: {resumed} jobs resumed, {repeated} in-flight calls repeated"
    );
    assert!(
        resumed > 0,
        "the kills hit no running job: the test proved nothing"
    );
}

// A second SIGTERM (an operator's second Ctrl-C) exits at once, without waiting out the grace
// period the first one started (10 minutes here, with a job that never finishes), unless it
// comes within 2 s of the first. Before, every signal after the first was swallowed: only
// SIGKILL ended the wait.
#[tokio::test]
async fn a_second_sigterm_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeUpstream::start().await;
    fake.set_default(Reply::Hang);
    let env = [("FUSION_SHUTDOWN_GRACE_SECONDS", "600")];
    let mut server = Server::start_with(
        &dir.path().join("f.db"),
        &fake.base_url(),
        free_port(),
        &env,
    )
    .await;
    let client = reqwest::Client::new();
    submit_unique_jobs(&client, &server, "h", 1).await;
    until("the job's first call", async || fake.total_calls() > 0).await;
    let first = std::time::Instant::now();
    server.send_term();
    // One within 2 s of the first is the same request (a supervisor passing a Ctrl-C on).
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.send_term();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the first SIGTERM waits for the running job"
    );
    // Well past the 2 s window, which starts when the server sees the first signal (a loaded
    // machine may deliver it late).
    tokio::time::sleep(Duration::from_millis(4000).saturating_sub(first.elapsed())).await;
    server.send_term();
    let status = tokio::time::timeout(Duration::from_secs(10), server.child.wait())
        .await
        .expect("a second SIGTERM exits at once")
        .unwrap();
    assert_eq!(status.code(), Some(128 + 15));
}

// The listener is bound before the database is opened: a port already taken (an older process
// still serving) stops the start before a migration, not after it.
#[tokio::test]
async fn a_port_in_use_stops_the_start_before_any_migration() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("f.db");
    let env = [
        ("DATABASE_URL", format!("sqlite://{}", db.display())),
        ("FUSION_LISTEN", taken.local_addr().unwrap().to_string()),
        ("FUSION_UPSTREAM_URL", "http://127.0.0.1:9/v1".to_string()),
    ];
    let stderr = failed_start("serve", &env).await;
    assert!(stderr.contains("Failed to listen on"), "{stderr}");
    assert!(!db.exists(), "the database was opened: {stderr}");
}

/// Run `fusion <command>` with `env`, which must fail within 20 s: its standard error.
pub async fn failed_start(command: &str, env: &[(&str, String)]) -> String {
    let run = Command::new(env!("CARGO_BIN_EXE_fusion"))
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .unwrap_or_else(|_| panic!("fusion {command} did not give up within 20 s"))
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// While the database is being opened (retried here: nothing listens on its port), the HTTP port
// is held but refuses connections, as a load balancer's TCP check expects of a process not
// ready yet; before, it accepted them, and they waited in its backlog until it was.
#[tokio::test]
async fn the_port_refuses_connections_until_the_store_is_open() {
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fusion"))
        .arg("serve")
        .env(
            "DATABASE_URL",
            format!("postgres://u@127.0.0.1:{}/x", free_port()),
        )
        .env("FUSION_LISTEN", format!("127.0.0.1:{port}"))
        .env("FUSION_UPSTREAM_URL", "http://127.0.0.1:9/v1")
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "still opening its database"
    );
    let connected = tokio::net::TcpStream::connect(("127.0.0.1", port)).await;
    assert!(
        connected.is_err(),
        "a connection was accepted before the store was open"
    );
    child.kill().await.unwrap();
}

// Two processes on one SQLite file, `serve` with no workers and a `worker`: a cancel made in
// `serve` stops the job running in the worker within seconds (the worker notices the other
// process's commit within a second), not at its next heartbeat (20 s here). Before, a cancel
// reached a worker in another process only through its heartbeat.
#[tokio::test]
async fn a_cancel_reaches_a_worker_in_another_process_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("f.db").display());
    // Within 5 s: well before the 20 s heartbeat, with room for a loaded machine.
    crate::postgres::a_cancel_in_serve_stops_the_worker(&url, Duration::from_secs(5)).await;
}
