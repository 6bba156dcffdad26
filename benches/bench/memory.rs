//! Scenario 3, memory: 2,000 jobs in flight at once, every panel call waiting on a 20 s
//! upstream. Figures: the server's peak RSS (VmHWM from /proc/PID/status), how many jobs were
//! in flight together, and errors (failed jobs, WARN/ERROR log lines).

use std::time::{Duration, Instant};

use crate::Ctx;
use crate::db::{self, Target};
use crate::fake::{Fake, Script};
use crate::load;
use crate::procs::{self, Server, ServerOpts};
use crate::report::{Results, figure};

const S: &str = "3 memory";
const PANEL: [&str; 3] = ["slow-a", "slow-b", "slow-c"];

pub async fn measure(ctx: &Ctx, target: &Target) -> anyhow::Result<Results> {
    let (jobs, upstream_ms) = (ctx.sizes.memory_jobs, ctx.sizes.memory_upstream_ms);
    let mut out = Results::default();
    let mut script = Script::default();
    for m in PANEL {
        script = script.delay(m, "panel", upstream_ms);
    }
    let fake = Fake::start(ctx.dir.path(), &script).await?;
    let opts = ServerOpts {
        concurrency: jobs as u32 + 100,
        ..ServerOpts::default()
    };
    let server = Server::start(ctx, &target.url, &fake.base_url(), &opts).await?;
    let db = target.open().await?;
    let idle_rss = procs::status_mib(server.pid, "VmRSS").unwrap_or(0.0);

    let started = Instant::now();
    let client = load::client(64);
    let body = load::job_body(&PANEL.map(String::from), "judge");
    let results = {
        let (c, b, body) = (client.clone(), server.address.clone(), body.clone());
        load::run_pool(32, jobs, Duration::from_secs(60), move |_| {
            let (c, b, body) = (c.clone(), b.clone(), body.clone());
            async move { load::submit(&c, &b, &body).await }
        })
        .await
    };
    let accepted = results.iter().filter(|r| r.0.is_ok()).count();
    if accepted < jobs {
        out.problems.push(format!(
            "memory: {} of {jobs} submits failed",
            jobs - accepted
        ));
    }

    // Wait until every panel call of every job is out at the fake at the same time.
    let wanted = (accepted * PANEL.len()) as u64;
    let mut in_flight_calls = 0;
    let deadline = Instant::now() + Duration::from_millis(upstream_ms * 3 / 4);
    while Instant::now() < deadline {
        in_flight_calls = fake.calls_of("panel").await?;
        if in_flight_calls >= wanted {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_out_after = started.elapsed().as_secs_f64();
    let running = db::count(&db.counts().await?, "running");
    let fds = procs::open_fds(server.pid);
    let rss_loaded = procs::status_mib(server.pid, "VmRSS").unwrap_or(0.0);
    // How many were out at once is a figure (it depends on how fast the submits went), not a
    // problem: in the short run, the first jobs may finish before the last is submitted.
    let in_flight = (running as u64).min(in_flight_calls / PANEL.len() as u64);

    // Let them finish: every accepted job must succeed, in the short run as in the full one.
    let limit = Duration::from_millis(upstream_ms) + Duration::from_secs(60);
    let (finished, counts) = db::wait_counts(&db, limit, Duration::from_millis(200), |c| {
        db::finished(c) >= accepted as i64
    })
    .await?;
    let peak = procs::status_mib(server.pid, "VmHWM").unwrap_or(f64::NAN);
    let failed = accepted as i64 - db::count(&counts, "succeeded");
    if !finished || failed > 0 {
        out.problems.push(format!(
            "memory: {failed} of {accepted} jobs did not succeed within {limit:?}: {counts:?}"
        ));
    }
    let warnings = server.problems();
    out.push(
        figure(
            S,
            format!(
                "{jobs} jobs × {:.1} s upstream: jobs in flight at once",
                upstream_ms as f64 / 1000.0
            ),
            in_flight as f64,
            0,
        )
        .at_least(jobs as f64),
    );
    // The target is 200 MB: decimal megabytes (190.7 MiB), the stricter reading.
    let peak_mb = peak * 1024.0 * 1024.0 / 1e6;
    out.push(
        figure(
            S,
            "peak RSS of the server, VmHWM (MB = 10⁶ bytes)",
            peak_mb,
            1,
        )
        .at_most(200.0),
    );
    out.push(
        figure(
            S,
            "errors: submits failed + jobs not succeeded + WARN/ERROR log lines",
            ((jobs - accepted) as i64 + failed.max(0) + warnings.len() as i64) as f64,
            0,
        )
        .at_most(0.0),
    );
    out.notes.push(format!(
        "memory: RSS {idle_rss:.1} MiB idle, {rss_loaded:.1} MiB with all in flight ({all_out_after:.1} s after the first submit; {running} running, {in_flight_calls} panel calls out), peak {peak:.1} MiB; {fds} open fds; jobs {counts:?}"
    ));
    out.server_warnings("memory", &warnings, true);
    db.close().await;
    server.terminate().await?;
    fake.stop().await;
    Ok(out)
}
