//! Scenario 1, overhead: a 3-model panel answering in 200/300/400 ms, analysis 150 ms, final
//! 150 ms, so the critical path is 700 ms. Clients run jobs back to back from 20 concurrent
//! tasks, first with the synchronous `POST /v1/chat/completions` (it answers when the job
//! succeeded), then with `POST /v1/jobs` and polling. Figures: (submit → succeeded) ÷ 700 ms.

use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::Ctx;
use crate::breakdown;
use crate::db::Target;
use crate::fake::{Fake, Script};
use crate::load::{self, percentile};
use crate::procs::{Server, ServerOpts};
use crate::report::{Results, figure};

const S: &str = "1 overhead";
const PANEL: [(&str, u64); 3] = [("p200", 200), ("p300", 300), ("p400", 400)];
const ANALYST: &str = "judge";
const ANALYSIS_MS: u64 = 150;
const FINAL_MS: u64 = 150;
/// How often a polling client asks for its job.
const POLL: Duration = Duration::from_millis(20);

pub async fn measure(ctx: &Ctx, target: &Target) -> anyhow::Result<Results> {
    let critical = (PANEL.iter().map(|p| p.1).max().unwrap() + ANALYSIS_MS + FINAL_MS) as f64;
    let mut script = Script::default()
        .delay(ANALYST, "analysis", ANALYSIS_MS)
        .delay(ANALYST, "final", FINAL_MS);
    for (model, ms) in PANEL {
        script = script.delay(model, "panel", ms);
    }
    measure_script(ctx, target, &script, critical).await
}

async fn measure_script(
    ctx: &Ctx,
    target: &Target,
    script: &Script,
    critical: f64,
) -> anyhow::Result<Results> {
    let fake = Fake::start(ctx.dir.path(), script).await?;
    let server = Server::start(ctx, &target.url, &fake.base_url(), &ServerOpts::default()).await?;
    let db = target.open().await?;
    let panel: Vec<String> = PANEL.iter().map(|p| p.0.to_string()).collect();
    let body = load::job_body(&panel, ANALYST);
    let (jobs, clients) = (ctx.sizes.overhead_jobs, ctx.sizes.overhead_clients);
    let client = load::client(clients * 2);
    let limit = Duration::from_secs(60 + (jobs as u64 / clients as u64) * 2);
    let mut out = Results::default();

    // Warm up: connections to the server and to the fake, and the database's caches.
    let base = server.address.clone();
    let warm_jobs = if ctx.quick { 0 } else { clients };
    let warm = {
        let (c, b, body) = (client.clone(), base.clone(), body.clone());
        load::run_pool(clients, warm_jobs, limit, move |_| {
            sync_chat(c.clone(), b.clone(), body.clone())
        })
        .await
    };
    check(&mut out, "warm-up", warm_jobs, &warm);

    let sync_since = load::now_ms();
    let sync = {
        let (c, b, body) = (client.clone(), base.clone(), body.clone());
        load::run_pool(clients, jobs, limit, move |_| {
            sync_chat(c.clone(), b.clone(), body.clone())
        })
        .await
    };
    check(&mut out, "sync chat", jobs, &sync);
    let ratios: Vec<f64> = ok_ms(&sync).iter().map(|ms| ms / critical).collect();
    out.push(
        figure(
            S,
            "sync chat: p50 (submit → succeeded) ÷ 700 ms",
            percentile(&ratios, 50.0),
            3,
        )
        .at_most(1.03),
    );
    out.push(figure(S, "sync chat: p99 ÷ 700 ms", percentile(&ratios, 99.0), 3).at_most(1.10));
    out.notes.push(format!(
        "overhead, sync chat: {} jobs from {clients} clients; p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms against a {critical:.0} ms critical path",
        ratios.len(),
        percentile(&ratios, 50.0) * critical,
        percentile(&ratios, 99.0) * critical,
        percentile(&ratios, 100.0) * critical,
    ));

    let since = load::now_ms();
    let polled = {
        let (c, b, body) = (client.clone(), base.clone(), body.clone());
        load::run_pool(clients, jobs, limit, move |_| {
            submit_and_poll(c.clone(), b.clone(), body.clone())
        })
        .await
    };
    check(&mut out, "jobs + poll", jobs, &polled);
    let ratios: Vec<f64> = ok_ms(&polled).iter().map(|ms| ms / critical).collect();
    out.push(figure(
        S,
        "jobs + 20 ms poll: p50 ÷ 700 ms",
        percentile(&ratios, 50.0),
        3,
    ));
    out.push(figure(
        S,
        "jobs + 20 ms poll: p99 ÷ 700 ms",
        percentile(&ratios, 99.0),
        3,
    ));
    // The same jobs as the server timed them (created_at → finished_at), free of poll steps.
    let (done, _) = db.timings(since).await?;
    let server_side: Vec<f64> = done
        .iter()
        .map(|t| (t[2] - t[0]) as f64 / critical)
        .collect();
    out.push(figure(
        S,
        "server-side (created → finished): p99 ÷ 700 ms",
        percentile(&server_side, 99.0),
        3,
    ));
    let queue_wait: Vec<f64> = done.iter().map(|t| (t[1] - t[0]) as f64).collect();
    out.notes.push(format!(
        "overhead, jobs + poll: server-side p50 {:.0} ms, p99 {:.0} ms; created → claimed p50 {:.0} ms, p99 {:.0} ms",
        percentile(&server_side, 50.0) * critical,
        percentile(&server_side, 99.0) * critical,
        percentile(&queue_wait, 50.0),
        percentile(&queue_wait, 99.0),
    ));

    // Outside the server's own timestamps: from the request to the job's creation, and from
    // the outcome (decided, not yet committed) to the answer in the client's hands.
    let finished = db.finish_times(sync_since, since).await?;
    let by_id: std::collections::HashMap<&str, (i64, i64)> = finished
        .iter()
        .map(|(id, c, f)| (id.as_str(), (*c, *f)))
        .collect();
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for (id, sent, answered) in sync.iter().filter_map(|r| r.0.as_ref().ok()) {
        if let Some((created, finished)) = by_id.get(id.as_str()) {
            before.push((created - sent) as f64);
            after.push((answered - finished) as f64);
        }
    }
    if !before.is_empty() {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        out.notes.push(format!(
            "overhead, sync chat, outside the job's timestamps ({} jobs, mean/p99 ms): \
             request sent → created {:.1}/{:.0} · finished → answer received {:.1}/{:.0}",
            before.len(),
            mean(&before),
            percentile(&before, 99.0),
            mean(&after),
            percentile(&after, 99.0),
        ));
    }

    let sync_jobs = breakdown::summary(&db, sync_since, since).await?;
    let poll_jobs = breakdown::summary(&db, since, i64::MAX).await?;
    for (what, line) in [("sync chat", sync_jobs), ("jobs + poll", poll_jobs)] {
        if let Some(line) = line {
            out.notes.push(format!("overhead, {what}, per job: {line}"));
        }
    }
    out.server_warnings("overhead", &server.problems(), false);
    db.close().await;
    server.terminate().await?;
    fake.stop().await;
    Ok(out)
}

/// One synchronous completion; checks it carries the fused answer. Returns the job id and the
/// unix ms at which the request was sent and the answer received.
async fn sync_chat(
    client: reqwest::Client,
    base: String,
    body: Value,
) -> anyhow::Result<(String, i64, i64)> {
    let url = format!("{base}/v1/chat/completions");
    let sent = load::now_ms();
    let v = load::post_json(&client, url, &body, 200).await?;
    let answered = load::now_ms();
    let content = v
        .pointer("/choices/0/message/content")
        .and_then(Value::as_str);
    anyhow::ensure!(
        content == Some("the fused final answer"),
        "unexpected answer: {v}"
    );
    let id = v["id"].as_str().and_then(|i| i.strip_prefix("fusion-"));
    let id = id.with_context(|| format!("no job id in {v}"))?;
    Ok((id.to_string(), sent, answered))
}

/// Submit, then poll every 20 ms until the job succeeded (at most 60 s).
async fn submit_and_poll(client: reqwest::Client, base: String, body: Value) -> anyhow::Result<()> {
    let id = load::submit(&client, &base, &body).await?;
    for _ in 0..3000 {
        tokio::time::sleep(POLL).await;
        let job: Value = client
            .get(format!("{base}/v1/jobs/{id}"))
            .send()
            .await?
            .json()
            .await?;
        match job["status"].as_str().context("no status")? {
            "succeeded" => return Ok(()),
            "queued" | "running" => {}
            other => anyhow::bail!("job {id} ended {other}: {job}"),
        }
    }
    anyhow::bail!("job {id} not done after 60 s")
}

fn ok_ms<T>(results: &[(anyhow::Result<T>, Duration)]) -> Vec<f64> {
    results
        .iter()
        .filter(|r| r.0.is_ok())
        .map(|r| r.1.as_secs_f64() * 1000.0)
        .collect()
}

/// A problem for each of `total` requests that failed or never started (`run_pool` stops
/// handing out work at its time limit): the percentiles are of the ones that succeeded.
fn check<T>(
    out: &mut Results,
    what: &str,
    total: usize,
    results: &[(anyhow::Result<T>, Duration)],
) {
    let unstarted = total.saturating_sub(results.len());
    if unstarted > 0 {
        out.problems.push(format!(
            "overhead {what}: {unstarted} of {total} requests not started by the time limit"
        ));
    }
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.0.as_ref().err().map(|e| e.to_string()))
        .collect();
    if !errors.is_empty() {
        let summary = load::summarize_errors(errors.iter().map(String::as_str));
        out.problems.push(format!(
            "overhead {what}: {} requests failed: {}",
            errors.len(),
            summary.join("; ")
        ));
    }
}
