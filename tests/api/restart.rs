//! Crash recovery with the real binary: SIGKILL the server while the analysis call hangs, start
//! it again on the same SQLite file, and the job finishes without calling any panel model twice.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};

use crate::fake_upstream::{FakeUpstream, Kind, Reply};
use crate::helpers::body_with_panel;

/// A `fusion serve` child process; killed with SIGKILL on drop.
pub struct Server {
    child: Child,
    pub address: String,
}

impl Server {
    pub async fn start(db: &Path, upstream: &str, port: u16) -> Server {
        let child = Command::new(env!("CARGO_BIN_EXE_fusion"))
            .arg("serve")
            .env("DATABASE_URL", format!("sqlite://{}", db.display()))
            .env("FUSION_LISTEN", format!("127.0.0.1:{port}"))
            .env("FUSION_UPSTREAM_URL", upstream)
            .env("FUSION_LEASE_SECONDS", "2")
            .env("FUSION_POLL_MS", "100")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("run target/debug/fusion");
        let address = format!("http://127.0.0.1:{port}");
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

    /// SIGKILL: no shutdown code runs, leases are left behind.
    pub async fn kill(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get_job(client: &reqwest::Client, server: &Server, id: &str) -> Value {
    client
        .get(format!("{}/v1/jobs/{id}", server.address))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_killed_server_resumes_the_job_from_its_checkpoints() {
    let fake = FakeUpstream::start().await;
    fake.script("judge", Kind::Analysis, vec![Reply::Hang]);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fusion.db");
    let port = free_port();
    let client = reqwest::Client::new();

    let server = Server::start(&db, &fake.base_url(), port).await;
    let resp = client
        .post(format!("{}/v1/jobs", server.address))
        .json(&body_with_panel(&["m1", "m2", "m3"], "judge"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Wait until every panel answer is checkpointed and the analysis call is hanging.
    for i in 0.. {
        let job = get_job(&client, &server, &id).await;
        let panel_done = job["panel"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["status"] == "succeeded");
        if panel_done && fake.calls("judge", Kind::Analysis) == 1 {
            break;
        }
        assert!(i < 500, "panel never finished: {job:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill().await;

    fake.script("judge", Kind::Analysis, vec![Reply::Ok]);
    let server = Server::start(&db, &fake.base_url(), port).await;
    let mut job = Value::Null;
    for _ in 0..500 {
        job = get_job(&client, &server, &id).await;
        if job["status"] == "succeeded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(job["status"], "succeeded", "{job:#}");
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
