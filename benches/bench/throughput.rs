//! Scenarios 2 (throughput) and 5 (enqueue), on one database, against a zero-latency fake:
//! 1. the fake's own capacity: the harness blasts it directly (calls/s ÷ 5 = the most fusion
//!    jobs/s an upstream this fast allows, each job being 3 panel + analysis + final calls),
//!    before the enqueue and again right after the drain;
//! 2. enqueue: `POST /v1/jobs` from 32 connections to an API-only server (`--concurrency 0`);
//! 3. drain: a server with workers starts on those queued jobs; the rate comes from the
//!    server's own timestamps (first claim → last finish);
//! 4. steady: a producer submits at a fixed rate to that server; completions/s once the
//!    first fifth of the window (the ramp) is over.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::Ctx;
use crate::breakdown;
use crate::db::{self, Target};
use crate::fake::{Fake, Script};
use crate::load::{self, percentile};
use crate::procs::{self, Cpu, Server, ServerOpts};
use crate::report::{Results, figure};

const T: &str = "2 throughput";
const E: &str = "5 enqueue";

pub async fn measure(ctx: &Ctx, target: &Target) -> anyhow::Result<Results> {
    let sizes = &ctx.sizes;
    let mut out = Results::default();
    let fake = Fake::start(ctx.dir.path(), &Script::default()).await?;

    // What a durable commit costs on this disk now (Postgres flushes the WAL at every commit).
    let flush = procs::flush_latency_us(ctx.dir.path())?;
    out.push(figure(
        T,
        "disk flush now: 8 KiB write + fdatasync, median (µs)",
        flush,
        0,
    ));

    // 1. The fake's capacity, measured now on this machine, and again right after the drain:
    // the machine's speed drifts, and the drain is divided by what it was around the drain.
    let before = capacity(ctx, &fake, "before the drain", &mut out).await;

    // 2. Enqueue to an API-only server.
    let panel: Vec<String> = ["m1", "m2", "m3"].map(String::from).to_vec();
    let body = load::job_body(&panel, "judge");
    let opts = ServerOpts {
        concurrency: 0,
        ..ServerOpts::default()
    };
    let api = Server::start(ctx, &target.url, &fake.base_url(), &opts).await?;
    let n = sizes.enqueue_jobs;
    let client = load::client(sizes.enqueue_conns * 2);
    let started = Instant::now();
    let results = {
        let (c, b, body) = (client.clone(), api.address.clone(), body.clone());
        load::run_pool(
            sizes.enqueue_conns,
            n,
            Duration::from_secs(120),
            move |_| {
                let (c, b, body) = (c.clone(), b.clone(), body.clone());
                async move { load::submit(&c, &b, &body).await }
            },
        )
        .await
    };
    let wall = started.elapsed().as_secs_f64();
    let accepted_ms: Vec<f64> = results
        .iter()
        .filter(|r| r.0.is_ok())
        .map(|r| r.1.as_secs_f64() * 1000.0)
        .collect();
    let accepted = accepted_ms.len();
    if accepted < n {
        let errs = results
            .iter()
            .filter_map(|r| r.0.as_ref().err().map(|e| e.to_string()));
        let errs: Vec<String> = errs.collect();
        let summary = load::summarize_errors(errs.iter().map(String::as_str));
        out.problems.push(format!(
            "enqueue: {} of {n} not accepted: {}",
            n - accepted,
            summary.join("; ")
        ));
    }
    out.push(
        figure(
            E,
            format!(
                "POST /v1/jobs from {} connections: accepted jobs/s",
                sizes.enqueue_conns
            ),
            accepted as f64 / wall,
            0,
        )
        .at_least(3000.0),
    );
    out.push(figure(
        E,
        "p99 response time (ms)",
        percentile(&accepted_ms, 99.0),
        1,
    ));
    out.notes.push(format!(
        "enqueue: {accepted} jobs in {wall:.2} s; response p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&accepted_ms, 50.0),
        percentile(&accepted_ms, 99.0),
        percentile(&accepted_ms, 100.0)
    ));
    api.terminate().await?;

    // 3. Drain the queued jobs.
    let db = target.open().await?;
    let opts = ServerOpts {
        concurrency: sizes.drain_concurrency,
        ..ServerOpts::default()
    };
    let wall_start = Instant::now();
    let stats0 = fake.stats(false).await?;
    let server = Server::start(ctx, &target.url, &fake.base_url(), &opts).await?;
    let cpu0 = Cpu::sample(server.pid, fake.pid);
    let threads0 = procs::threads(server.pid);
    let switches0 = procs::context_switches(server.pid);
    // CPU shares are taken over the sampled window (ready → drained, give or take one poll),
    // not over the server's start-up, which would read as idle cores.
    let sampled = Instant::now();
    let xid0 = db.xid().await?;
    let wal0 = db.wal_bytes().await?;
    let total = accepted as i64;
    let limit = Duration::from_secs(60 + total as u64 / 20);
    let (drained, counts) = db::wait_counts(&db, limit, Duration::from_millis(100), |c| {
        db::finished(c) >= total
    })
    .await?;
    let cpu1 = Cpu::sample(server.pid, fake.pid);
    let threads1 = procs::threads(server.pid);
    let switches1 = procs::context_switches(server.pid);
    let window = sampled.elapsed().as_secs_f64();
    let xid1 = db.xid().await?;
    let wal1 = db.wal_bytes().await?;
    let wall = wall_start.elapsed().as_secs_f64();
    let flush_after = procs::flush_latency_us(ctx.dir.path())?;
    check_blast_bodies(&body_sizes(&stats0, &fake.stats(false).await?), &mut out);
    if !drained || db::count(&counts, "succeeded") < total {
        out.problems
            .push(format!("drain: after {wall:.0} s the jobs are {counts:?}"));
    }
    let (done, _) = db.timings(0).await?;
    let first_claim = done.iter().map(|t| t[1]).min().unwrap_or(0);
    let last_finish = done.iter().map(|t| t[2]).max().unwrap_or(0);
    let drain_secs = ((last_finish - first_claim) as f64 / 1000.0).max(0.001);
    let rate = done.len() as f64 / drain_secs;
    let mut tenths = [0usize; 10];
    for t in &done {
        let at = (t[2] - first_claim) as f64 / 1000.0 / drain_secs;
        tenths[((at * 10.0) as usize).min(9)] += 1;
    }
    out.notes.push(format!(
        "drain: jobs finished in each tenth of the {drain_secs:.2} s: {tenths:?}"
    ));
    out.push(figure(T, format!("drain {total} queued jobs: jobs/s"), rate, 0).at_least(1000.0));
    let after = capacity(ctx, &fake, "after the drain", &mut out).await;
    out.push(
        figure(
            T,
            "drain jobs/s ÷ upstream-bound jobs/s (mean of before and after)",
            rate / ((before + after) / 2.0 / 5.0),
            2,
        )
        .at_least(0.5),
    );
    let [srv, fk, pg, harness] = cpu0.ms_per(&cpu1, done.len() as f64);
    let busy = (srv + fk + pg + harness) * done.len() as f64 / 1000.0 / (window * 2.0);
    out.notes.push(format!(
        "drain: {} jobs in {drain_secs:.2} s (first claim → last finish) with --concurrency {}; CPU per job: server {srv:.3} ms, fake {fk:.3} ms, postgres {pg:.3} ms, harness {harness:.2} ms; both cores {:.0}% busy over the {window:.2} s from the server ready to the drain seen done",
        done.len(),
        sizes.drain_concurrency,
        busy * 100.0
    ));
    out.notes.push(format!(
        "drain: busiest server threads (% of one core over those {window:.2} s): {}; server context switches per job {:.1}; disk flush {flush:.0} µs before the drain, {flush_after:.0} µs after",
        procs::busiest_threads(&threads0, &threads1, window, 5),
        switches1.saturating_sub(switches0) as f64 / done.len().max(1) as f64
    ));
    if let (Some(x0), Some(x1), Some(w0), Some(w1)) = (xid0, xid1, wal0, wal1) {
        let writes = (x1 - x0 - 1) as f64;
        let jobs = done.len().max(1) as f64;
        out.notes.push(format!(
            "drain: {writes} Postgres write transactions (cluster-wide), {:.1} per job, {:.0} per second; {:.0} bytes of WAL per job",
            writes / jobs,
            writes / drain_secs,
            (w1 - w0) as f64 / jobs
        ));
    }

    // 4. A steady producer on the same server.
    let since = load::now_ms();
    if let Some(line) = breakdown::summary(&db, 0, since).await? {
        out.notes.push(format!("drain, per job: {line}"));
    }
    let rate = sizes.steady_rate;
    // The window is the producer's own, from its start (the summary's read above is not in it).
    let started = load::now_ms();
    let produced = load::produce(
        &client,
        &server.address,
        &body,
        rate,
        sizes.steady_secs,
        512,
    )
    .await;
    let window_end = started + (produced.secs * 1000.0) as i64;
    let expected = total + produced.accepted as i64;
    let (_, counts) = db::wait_counts(
        &db,
        Duration::from_secs(60 + produced.accepted as u64 / 50),
        Duration::from_millis(100),
        |c| db::finished(c) >= expected,
    )
    .await?;
    if db::count(&counts, "succeeded") < expected || !produced.errors.is_empty() {
        let summary = load::summarize_errors(produced.errors.iter().map(String::as_str));
        out.problems.push(format!(
            "steady: jobs {counts:?}, submit errors: {}",
            summary.join("; ")
        ));
    }
    let (done, _) = db.timings(since).await?;
    // Steady state: completions after the first fifth of the window (the ramp) until it ends.
    let window_start = started + (produced.secs * 200.0) as i64;
    let in_window = done
        .iter()
        .filter(|t| (window_start..=window_end).contains(&t[2]))
        .count();
    let window_secs = (window_end - window_start) as f64 / 1000.0;
    let latency: Vec<f64> = done.iter().map(|t| (t[2] - t[0]) as f64).collect();
    out.push(
        figure(
            T,
            format!("steady producer at {rate}/s: completed jobs/s"),
            in_window as f64 / window_secs.max(0.001),
            0,
        )
        .at_least(1000.0),
    );
    out.push(figure(
        T,
        "steady: p99 job latency, created → finished (ms)",
        percentile(&latency, 99.0),
        0,
    ));
    out.notes.push(format!(
        "steady: offered {} jobs in {:.1} s ({:.0}/s accepted, {} sends waited for a free connection); job latency p50 {:.0} ms, p99 {:.0} ms",
        produced.accepted,
        produced.secs,
        produced.accepted as f64 / produced.secs,
        produced.throttled,
        percentile(&latency, 50.0),
        percentile(&latency, 99.0)
    ));
    if let Some(line) = breakdown::summary(&db, since, i64::MAX).await? {
        out.notes.push(format!("steady, per job: {line}"));
    }
    out.server_warnings("throughput", &server.problems(), false);
    db.close().await;
    server.terminate().await?;
    fake.stop().await;
    Ok(out)
}

/// Blast the fake alone and report its capacity as a figure (calls/s ÷ 5, the upstream-bound
/// jobs/s) and a note; returns calls/s.
async fn capacity(ctx: &Ctx, fake: &Fake, when: &str, out: &mut Results) -> f64 {
    let sizes = &ctx.sizes;
    let cpu0 = Cpu::sample(0, fake.pid);
    let (calls, secs) = blast(fake, sizes.blast_conns, sizes.blast_secs).await;
    let cpu1 = Cpu::sample(0, fake.pid);
    let per_call = cpu0.ms_per(&cpu1, calls as f64);
    let capacity = calls as f64 / secs;
    out.push(figure(
        T,
        format!(
            "fake upstream and a bare client alone {when}: calls/s ÷ 5 (upstream-bound jobs/s)"
        ),
        capacity / 5.0,
        0,
    ));
    out.notes.push(format!(
        "fake upstream blasted {when} from {} connections: {calls} calls in {secs:.1} s; CPU per call: fake {:.0} µs, harness {:.0} µs",
        sizes.blast_conns,
        per_call[1] * 1000.0,
        per_call[3] * 1000.0
    ));
    capacity
}

/// Call the fake directly from `conns` connections for `secs` seconds, cycling through bodies
/// shaped like a job's five calls. Returns (successful calls, seconds).
async fn blast(fake: &Fake, conns: usize, secs: f64) -> (usize, f64) {
    // Serialized once: the harness shares the two cores with the fake, and what it spends per
    // call is taken from the capacity being measured.
    let bodies: Vec<bytes::Bytes> = job_calls().into_iter().map(|(_, body)| body).collect();
    let bodies = std::sync::Arc::new(bodies);
    let client = load::client(conns * 2);
    let url = reqwest::Url::parse(&format!("{}/chat/completions", fake.base_url())).expect("url");
    let started = Instant::now();
    let results = load::run_pool(conns, usize::MAX, Duration::from_secs_f64(secs), move |i| {
        let (client, url, bodies) = (client.clone(), url.clone(), bodies.clone());
        async move {
            let resp = client
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bodies[i % bodies.len()].clone())
                .send()
                .await?;
            anyhow::ensure!(resp.status() == 200, "fake answered {}", resp.status());
            resp.bytes().await?;
            Ok(())
        }
    })
    .await;
    let ok = results.iter().filter(|r| r.0.is_ok()).count();
    (ok, started.elapsed().as_secs_f64())
}

/// The five request bodies fusion sends for one of the harness's jobs (`load::job_body`) when
/// the fake answers with its defaults: three panel calls, the analysis call (the answers and
/// the schema's `response_format`) and the final call, their messages written by fusion's own
/// prompt functions with the default configuration. The drain's real bodies are compared with
/// these after it (`body_sizes`), so the two cannot drift apart unseen. Serialized, as sent.
fn job_calls() -> Vec<(&'static str, bytes::Bytes)> {
    use fusion::fusion::analysis::{self, Analysis};
    use fusion::fusion::prompts::{self, PanelAnswer};
    use fusion::upstream::StructuredOutput;

    let question = load::job_body(&[], "judge")["messages"]
        .as_array()
        .unwrap()
        .clone();
    let panel = ["m1", "m2", "m3"];
    let contents = panel.map(|m| format!("panel answer from {m}"));
    let answers: Vec<PanelAnswer<'_>> = panel
        .iter()
        .zip(&contents)
        .map(|(model, content)| PanelAnswer {
            model,
            content,
            cut: false,
            omitted: 0,
        })
        .collect();
    // The bench's servers run with no configuration file: the defaults.
    let defaults: fusion::config::FileConfig = toml::from_str("").expect("empty configuration");
    let limits = defaults.resolve(&|_| None).expect("defaults").analysis;
    let analysis: Analysis =
        serde_json::from_str(crate::fake_upstream::VALID_ANALYSIS).expect("the fake's analysis");
    let mut bodies: Vec<(&str, Value)> = panel
        .iter()
        .map(|m| {
            (
                "panel",
                json!({"model": m, "messages": question, "stream": false}),
            )
        })
        .collect();
    bodies.push((
        "analysis",
        json!({
            "model": "judge", "stream": false, "temperature": 0.0,
            "messages": prompts::analysis_messages(&question, &answers, None),
            "response_format": analysis::response_format(StructuredOutput::JsonSchema, &limits),
        }),
    ));
    bodies.push((
        "final",
        json!({
            "model": "judge", "stream": false, "temperature": 0.0,
            "messages": prompts::final_messages(&question, &answers, Some(&analysis)),
        }),
    ));
    bodies
        .into_iter()
        .map(|(kind, body)| (kind, serde_json::to_vec(&body).expect("a JSON body").into()))
        .collect()
}

/// The fake's capacity is measured with `job_calls`' bodies: they must be the size of what the
/// drain sent (`drained`: mean bytes per call of each kind), or the capacity is of another load.
fn check_blast_bodies(drained: &[(String, f64)], out: &mut Results) {
    let blasted = job_calls();
    let mut sizes = Vec::new();
    for (kind, sent) in drained {
        let ours: Vec<usize> = (blasted.iter())
            .filter(|(k, _)| k == kind)
            .map(|(_, b)| b.len())
            .collect();
        let blast = ours.iter().sum::<usize>() as f64 / ours.len().max(1) as f64;
        sizes.push(format!("{kind} {sent:.0} / {blast:.0}"));
        if (blast - sent).abs() > sent * 0.02 {
            out.problems.push(format!(
                "the blast's {kind} bodies are {blast:.0} bytes, the drain's {sent:.0}: the fake's \
                 capacity would be measured under another load (see `job_calls`)"
            ));
        }
    }
    out.notes.push(format!(
        "request body bytes per call, drain / blast: {}",
        sizes.join(", ")
    ));
}

/// Mean request bytes per call of each kind (`panel`, `analysis`, `final`) the fake received
/// between two of its stats answers.
fn body_sizes(before: &Value, after: &Value) -> Vec<(String, f64)> {
    let totals = |stats: &Value, kind: &str| {
        crate::fake::entries(stats)
            .filter(|e| e["kind"] == kind)
            .map(|e| {
                (
                    e["calls"].as_f64().unwrap_or(0.0),
                    e["bytes"].as_f64().unwrap_or(0.0),
                )
            })
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    ["panel", "analysis", "final"]
        .into_iter()
        .map(|kind| {
            let (c0, b0) = totals(before, kind);
            let (c1, b1) = totals(after, kind);
            (kind.to_string(), (b1 - b0) / (c1 - c0).max(1.0))
        })
        .collect()
}
