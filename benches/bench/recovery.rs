//! Scenario 4, recovery: 500 jobs with their own models (so every upstream call names its step)
//! and scattered latencies (one of 10 s, so that a job is running at the kill) run at once under
//! a 2 s lease; the server is SIGKILLed once 40% have succeeded and started again on the same
//! database. Figures: how long until every orphaned job
//! (running at the kill) runs again or is finished, and upstream calls made again for a step
//! after its checkpoint was written (must be none; calls in flight at the kill may repeat).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::Ctx;
use crate::db::{self, Db, Target};
use crate::fake::{self, Fake, Script};
use crate::load::{self, now_ms, percentile};
use crate::procs::{Server, ServerOpts};
use crate::report::{Results, figure};

const S: &str = "4 recovery";
/// Kill once this share of the jobs succeeded.
const KILL_AT: f64 = 0.4;

/// Latency of one call, scattered over 100..=900 ms (panel) or 100..=500 ms (analysis, final).
fn delay(job: usize, salt: usize, span: u64) -> u64 {
    let h = (job as u64 * 2_654_435_761 + salt as u64 * 40_503).wrapping_mul(0x9E37_79B9) >> 7;
    100 + h % span
}

pub async fn measure(ctx: &Ctx, target: &Target) -> anyhow::Result<Results> {
    let (n, lease) = (ctx.sizes.recovery_jobs, ctx.sizes.recovery_lease_s);
    let mut out = Results::default();
    let mut script = Script::default();
    for i in 0..n {
        for (s, m) in ["a", "b", "c"].iter().enumerate() {
            // One straggler, still running at the kill however late it comes: in the short run
            // the others may all be done by then.
            let ms = if i == 0 && s == 0 {
                10_000
            } else {
                delay(i, s, 801)
            };
            script = script.delay(&format!("r{i}-{m}"), "panel", ms);
        }
        script = script
            .delay(&format!("r{i}-j"), "analysis", delay(i, 3, 401))
            .delay(&format!("r{i}-j"), "final", delay(i, 4, 401));
    }
    let fake = Fake::start(ctx.dir.path(), &script).await?;
    let opts = ServerOpts {
        concurrency: n as u32 + 12,
        lease_seconds: lease,
    };
    let server = Server::start(ctx, &target.url, &fake.base_url(), &opts).await?;
    let db = target.open().await?;
    let client = load::client(64);
    let results = {
        let (c, b) = (client.clone(), server.address.clone());
        load::run_pool(32, n, Duration::from_secs(60), move |i| {
            let (c, b) = (c.clone(), b.clone());
            let panel = ["a", "b", "c"].map(|m| format!("r{i}-{m}")).to_vec();
            async move {
                let body = load::job_body(&panel, &format!("r{i}-j"));
                Ok((load::submit(&c, &b, &body).await?, i))
            }
        })
        .await
    };
    let index: HashMap<String, usize> = results.into_iter().filter_map(|r| r.0.ok()).collect();
    let accepted = index.len() as i64;
    anyhow::ensure!(
        accepted == n as i64,
        "recovery: only {accepted} of {n} jobs accepted"
    );

    let kill_at = (n as f64 * KILL_AT).ceil() as i64;
    let (reached, _) = db::wait_counts(
        &db,
        Duration::from_secs(60),
        Duration::from_millis(10),
        |c| db::count(c, "succeeded") >= kill_at,
    )
    .await?;
    anyhow::ensure!(reached, "recovery: {kill_at} jobs never succeeded");
    let killed_at = now_ms();
    server.kill().await?;
    // The checkpoints as the kill left them: a step called again after the restart writes its
    // row again, and its `created_at` with it.
    let at_kill = db.steps().await?;
    let orphans: HashMap<String, i32> = db
        .jobs()
        .await?
        .into_iter()
        .filter(|j| j.status == "running")
        .map(|j| (j.id, j.attempt))
        .collect();
    let done_at_kill = db::count(&db.counts().await?, "succeeded");
    // Every job runs at once, for seconds: a kill that finds none running tested nothing, and
    // "0 repeated calls" below would say nothing.
    if orphans.is_empty() {
        out.problems
            .push("recovery: the SIGKILL found no job running".to_string());
    }

    // Watch the orphans from now on, while the new server starts.
    let watch_db = target.open().await?;
    let watch_orphans = orphans.clone();
    let limit = Duration::from_secs(lease + 30);
    let watcher = tokio::spawn(async move {
        let r = watch(&watch_db, &watch_orphans, killed_at, limit).await;
        watch_db.close().await;
        r
    });
    // The killed server's calls all began before this (some after `killed_at`, which is taken
    // before the signal is sent), the new one's after it.
    let restarted_at = now_ms();
    let server = Server::start(ctx, &target.url, &fake.base_url(), &opts).await?;
    let resumed = watcher.await??;
    let (all_done, counts) = db::wait_counts(
        &db,
        Duration::from_secs(60),
        Duration::from_millis(100),
        |c| db::finished(c) >= n as i64,
    )
    .await?;
    if !all_done || db::count(&counts, "succeeded") < n as i64 {
        out.problems
            .push(format!("recovery: jobs did not all succeed: {counts:?}"));
    }
    if resumed.len() < orphans.len() {
        out.problems.push(format!(
            "recovery: {} of {} orphaned jobs never ran again within {limit:?}",
            orphans.len() - resumed.len(),
            orphans.len()
        ));
    }

    // "0 repeated" says something only if some orphan had a checkpoint to repeat.
    let checkpointed = orphans
        .keys()
        .filter_map(|id| index.get(id))
        .filter(|i| {
            let prefix = format!("r{i}-");
            at_kill.iter().any(|s| s.model.starts_with(&prefix))
        })
        .count();
    if !orphans.is_empty() && checkpointed == 0 {
        out.problems.push(
            "recovery: no orphan had a checkpoint at the SIGKILL; no repeat could be seen"
                .to_string(),
        );
    }
    let stats = fake.stats(true).await?;
    let (repeated, in_flight_repeats, unexplained, missing) =
        repeats(&db, &at_kill, &stats, restarted_at).await?;
    if unexplained > 0 {
        out.problems.push(format!(
            "recovery: {unexplained} upstream calls were made again for a step that had no \
             call in flight at the SIGKILL"
        ));
    }
    if missing > 0 {
        out.problems.push(format!(
            "recovery: {missing} checkpoints had no upstream call"
        ));
    }
    if repeated > 0 {
        out.problems.push(format!(
            "recovery: {repeated} upstream calls repeated a checkpointed step"
        ));
    }
    let first_calls = first_calls_after(&stats, killed_at, &orphans, &index);
    // Not a number (so not met) unless every orphan was seen running again.
    let worst = match resumed.len() == orphans.len() && !orphans.is_empty() {
        true => resumed.values().copied().fold(0.0, f64::max),
        false => f64::NAN,
    };
    let secs: Vec<f64> = resumed.values().copied().collect();
    out.push(figure(
        S,
        "orphaned jobs (running at the SIGKILL)",
        orphans.len() as f64,
        0,
    ));
    out.push(
        figure(
            S,
            format!("time until every orphan runs again (s), lease {lease} s"),
            worst,
            2,
        )
        .at_most(lease as f64 + 1.0),
    );
    out.push(
        figure(
            S,
            "upstream calls repeated for checkpointed steps",
            repeated as f64,
            0,
        )
        .at_most(0.0),
    );
    out.push(figure(
        S,
        "in-flight calls repeated (allowed)",
        in_flight_repeats as f64,
        0,
    ));
    out.notes.push(format!(
        "recovery: {n} jobs, SIGKILL once {done_at_kill} had succeeded; orphans running again after p50 {:.2} s, max {worst:.2} s (polled every 20 ms); their first upstream calls after the kill: p50 +{:.2} s, max +{:.2} s ({} orphans made none)",
        percentile(&secs, 50.0),
        percentile(&first_calls.0, 50.0),
        percentile(&first_calls.0, 100.0),
        first_calls.1,
    ));
    db.close().await;
    server.terminate().await?;
    fake.stop().await;
    Ok(out)
}

/// Poll every 20 ms until each orphan runs again (a later attempt) or is finished; seconds
/// after the kill, per orphan seen.
async fn watch(
    db: &Db,
    orphans: &HashMap<String, i32>,
    killed_at: i64,
    limit: Duration,
) -> anyhow::Result<HashMap<String, f64>> {
    let mut seen = HashMap::new();
    let deadline = Instant::now() + limit;
    while seen.len() < orphans.len() && Instant::now() < deadline {
        for job in db.jobs().await? {
            let Some(&attempt) = orphans.get(&job.id) else {
                continue;
            };
            let back = (job.status == "running" && job.attempt > attempt)
                || matches!(job.status.as_str(), "succeeded" | "failed" | "cancelled");
            if back && !seen.contains_key(&job.id) {
                seen.insert(job.id, (now_ms() - killed_at) as f64 / 1000.0);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(seen)
}

/// Upstream calls per checkpoint: (calls that began after the checkpoint was first written —
/// by the kill's reading `at_kill` if it was there, else as it is now —; calls before it beyond
/// the first that are explained by the kill: one begun by the killed server, in flight, and
/// one by the new one, started at `restarted_at`; any others before it, unexplained;
/// checkpoints with no call at all). The fake fails no call here, so a step has no other reason
/// to be called twice.
async fn repeats(
    db: &Db,
    at_kill: &[db::StepRow],
    stats: &Value,
    restarted_at: i64,
) -> anyhow::Result<(usize, usize, usize, usize)> {
    let first: HashMap<(&str, &str), i64> = at_kill
        .iter()
        .map(|s| ((s.model.as_str(), s.step.as_str()), s.created_at))
        .collect();
    let mut starts: HashMap<(String, String), Vec<i64>> = HashMap::new();
    for e in fake::entries(stats) {
        let key = (
            e["model"].as_str().unwrap_or_default().to_string(),
            e["kind"].as_str().unwrap_or_default().to_string(),
        );
        let times = e["starts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_i64);
        starts.insert(key, times.collect());
    }
    let (mut repeated, mut in_flight, mut unexplained, mut missing) = (0, 0, 0, 0);
    for step in db.steps().await? {
        let kind = if step.step.starts_with("panel:") {
            "panel"
        } else {
            step.step.as_str()
        };
        let calls = starts
            .get(&(step.model.clone(), kind.to_string()))
            .cloned()
            .unwrap_or_default();
        let written = first
            .get(&(step.model.as_str(), step.step.as_str()))
            .copied()
            .unwrap_or(step.created_at);
        let after = calls.iter().filter(|&&s| s > written).count();
        repeated += after;
        let before: Vec<i64> = calls.iter().copied().filter(|&s| s <= written).collect();
        match before.as_slice() {
            [a, b] if a.min(b) < &restarted_at && a.max(b) >= &restarted_at => in_flight += 1,
            _ => unexplained += before.len().saturating_sub(1),
        }
        missing += usize::from(before.is_empty());
    }
    Ok((repeated, in_flight, unexplained, missing))
}

/// Per orphan, seconds from the kill to its first upstream call after it (the fake's clock);
/// and how many orphans made no call (every step was checkpointed, only the outcome was left).
fn first_calls_after(
    stats: &Value,
    killed_at: i64,
    orphans: &HashMap<String, i32>,
    index: &HashMap<String, usize>,
) -> (Vec<f64>, usize) {
    let mut first: HashMap<&str, i64> = HashMap::new();
    for e in fake::entries(stats) {
        let model = e["model"].as_str().unwrap_or_default();
        let after = e["starts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_i64);
        if let Some(t) = after.filter(|&s| s > killed_at).min() {
            let job = model.rsplit_once('-').map_or(model, |(job, _)| job);
            let slot = first.entry(job).or_insert(t);
            *slot = (*slot).min(t);
        }
    }
    let mut secs = Vec::new();
    let mut none = 0;
    for id in orphans.keys() {
        let job = index.get(id).map(|i| format!("r{i}"));
        match job.and_then(|j| first.get(j.as_str()).copied()) {
            Some(t) => secs.push((t - killed_at) as f64 / 1000.0),
            None => none += 1,
        }
    }
    (secs, none)
}
