//! The fake upstream in its own process: `bench fake-upstream --script FILE` runs the test fake
//! (`tests/api/fake_upstream.rs`) with scripted latencies and prints its address; `Fake` is the
//! harness's handle on that child process (start, stats, CPU time, stop).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use crate::fake_upstream::{FakeUpstream, Kind, Reply};

/// Latencies to script. Every answer is the fake's default valid answer for its kind.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Script {
    /// Delay (ms) of every call whose (model, kind) is not listed.
    pub default_ms: u64,
    /// `(model, kind, delay ms)`, kind being `panel`, `analysis` or `final`.
    pub delays: Vec<(String, String, u64)>,
}

impl Script {
    pub fn delay(mut self, model: &str, kind: &str, ms: u64) -> Script {
        self.delays.push((model.to_string(), kind.to_string(), ms));
        self
    }
}

fn reply(ms: u64) -> Reply {
    match ms {
        0 => Reply::Ok,
        ms => Reply::Delay(ms, Box::new(Reply::Ok)),
    }
}

/// The child side: serve until stdin closes (the harness exited or dropped its handle).
pub async fn serve(script: &Path) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(script)?;
    let script: Script = serde_json::from_str(&text).context("bad fake script")?;
    let fake = FakeUpstream::start_on("127.0.0.1:0").await;
    fake.record_bodies(false);
    fake.set_default(reply(script.default_ms));
    for (model, kind, ms) in &script.delays {
        let kind = Kind::parse(kind).with_context(|| format!("bad kind `{kind}`"))?;
        fake.script(model, kind, vec![reply(*ms)]);
    }
    println!("listening {}", fake.addr);
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    Ok(true)
}

/// A running fake upstream process.
pub struct Fake {
    child: Child,
    /// Held open: the child exits when it closes.
    _stdin: ChildStdin,
    pub pid: u32,
    /// `http://127.0.0.1:PORT`
    pub address: String,
    http: reqwest::Client,
}

impl Fake {
    pub async fn start(dir: &Path, script: &Script) -> anyhow::Result<Fake> {
        let path = dir.join(format!("fake-{}.json", uuid::Uuid::now_v7().simple()));
        std::fs::write(&path, serde_json::to_vec(script)?)?;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("fake-upstream")
            .arg("--script")
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("start the fake upstream")?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("the fake upstream did not start within 30 s")??
            .context("the fake upstream exited at start")?;
        let addr = line
            .strip_prefix("listening ")
            .with_context(|| format!("unexpected line from the fake: {line}"))?;
        Ok(Fake {
            pid: child.id().context("fake pid")?,
            child,
            _stdin: stdin,
            address: format!("http://{addr}"),
            http: crate::load::client(4),
        })
    }

    /// The base URL for `FUSION_UPSTREAM_URL`.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.address)
    }

    /// `GET /_fake/stats` (see `fake_upstream::stats_of`).
    pub async fn stats(&self, starts: bool) -> anyhow::Result<Value> {
        let url = format!("{}/_fake/stats?starts={starts}", self.address);
        Ok(self.http.get(url).send().await?.json().await?)
    }

    /// Calls received so far of `kind`, over every model.
    pub async fn calls_of(&self, kind: &str) -> anyhow::Result<u64> {
        let stats = self.stats(false).await?;
        Ok(entries(&stats)
            .filter(|e| e["kind"] == kind)
            .map(|e| e["calls"].as_u64().unwrap_or(0))
            .sum())
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The per-(model, kind) entries of a stats answer.
pub fn entries(stats: &Value) -> impl Iterator<Item = &Value> {
    stats["calls"].as_array().into_iter().flatten()
}
