//! Load generation against the server: job bodies, `N` client tasks sharing a fixed amount of
//! work, an open-loop producer at a fixed rate, and percentiles. Every loop is bounded in count
//! and in time; every request goes to 127.0.0.1.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};

/// A client for loopback traffic: no proxy, up to `conns` idle keep-alive connections.
pub fn client(conns: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(conns)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("reqwest client")
}

/// A fusion job body with this panel and analyst.
pub fn job_body(panel: &[String], analyst: &str) -> Value {
    json!({
        "model": "fusion",
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "plugins": [{"id": "fusion", "model": analyst, "analysis_models": panel}],
    })
}

/// POST `body` as JSON: the answer's JSON, or an error naming the status when it is not
/// `expected`.
pub async fn post_json(
    client: &reqwest::Client,
    url: String,
    body: &Value,
    expected: u16,
) -> anyhow::Result<Value> {
    let resp = client.post(&url).json(body).send().await?;
    let status = resp.status();
    anyhow::ensure!(
        status == expected,
        "{url} answered {status}: {}",
        resp.text().await?
    );
    Ok(resp.json().await?)
}

/// `POST /v1/jobs`: the job id, or an error naming the status.
pub async fn submit(client: &reqwest::Client, base: &str, body: &Value) -> anyhow::Result<String> {
    let job = post_json(client, format!("{base}/v1/jobs"), body, 202).await?;
    Ok(job["id"].as_str().context("no job id")?.to_string())
}

/// `tasks` client tasks run `work(i)` for `i` in `0..total`, each taking the next `i`; stops
/// at `limit`. Returns each call's result and duration, in `i` order of completion.
pub async fn run_pool<F, Fut, T>(
    tasks: usize,
    total: usize,
    limit: Duration,
    work: F,
) -> Vec<(anyhow::Result<T>, Duration)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<T>> + Send,
    T: Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let work = Arc::new(work);
    let deadline = Instant::now() + limit;
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (next, work) = (next.clone(), work.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total || Instant::now() >= deadline {
                        return out;
                    }
                    let t = Instant::now();
                    let left = deadline.saturating_duration_since(t);
                    let r = match tokio::time::timeout(left, work(i)).await {
                        Ok(r) => r,
                        Err(_) => Err(anyhow::anyhow!(
                            "request {i} still running at the time limit"
                        )),
                    };
                    out.push((r, t.elapsed()));
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total.min(1 << 16));
    for h in handles {
        all.extend(h.await.expect("client task panicked"));
    }
    all
}

/// What an open-loop producer did.
pub struct Produced {
    /// Jobs accepted (202).
    pub accepted: usize,
    /// Requests that failed.
    pub errors: Vec<String>,
    /// Seconds from the first send to the last send.
    pub secs: f64,
    /// Sends that had to wait because `max_in_flight` requests were already out.
    pub throttled: usize,
}

/// Submit `rate` jobs a second for `secs` seconds (sends are spread evenly, every 5 ms), with
/// at most `max_in_flight` requests outstanding.
pub async fn produce(
    client: &reqwest::Client,
    base: &str,
    body: &Value,
    rate: u32,
    secs: u64,
    max_in_flight: usize,
) -> Produced {
    let total = rate as usize * secs as usize;
    let permits = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let mut sent = 0;
    let mut throttled = 0;
    while sent < total && start.elapsed() < Duration::from_secs(secs * 3 + 5) {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as usize).min(total);
        while sent < due {
            let permit = match permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    throttled += 1;
                    permits.clone().acquire_owned().await.expect("open")
                }
            };
            let (client, url, body) = (client.clone(), base.to_string(), body.clone());
            tasks.spawn(async move {
                let r = submit(&client, &url, &body).await;
                drop(permit);
                r
            });
            sent += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let mut produced = Produced {
        accepted: 0,
        errors: vec![],
        secs,
        throttled,
    };
    while let Some(r) = tasks.join_next().await {
        match r.expect("producer task panicked") {
            Ok(_) => produced.accepted += 1,
            Err(e) => produced.errors.push(e.to_string()),
        }
    }
    produced
}

/// Nearest-rank percentile (`p` in 0..=100) of unsorted values; 0 when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Unix time in milliseconds (the clock the server stamps jobs and steps with).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// The first few distinct error messages, for a report.
pub fn summarize_errors<'a>(errors: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let mut total = 0;
    for e in errors {
        total += 1;
        if seen.len() < 3 && !seen.iter().any(|s| s == e) {
            seen.push(e.to_string());
        }
    }
    if total > seen.len() {
        seen.push(format!("({total} errors in all)"));
    }
    seen
}
