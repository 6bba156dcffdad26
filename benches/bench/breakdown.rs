//! Where a job's time goes, from the server's own timestamps: `jobs.created_at / started_at /
//! finished_at` and, per checkpoint, `steps.created_at` (when its upstream call returned) and
//! `steps.latency_ms` (how long that call took). Between the calls lie the checkpoint writes:
//! the gap from the last panel answer to the analysis call is the time to save the panel, and
//! so on. `started_at` is the claim's time, or the creation for a job started at its submit
//! (whose insert commit then falls in "started→1st call"); `finished_at` is when the worker
//! decided the outcome, before its commit. Times have 1 ms resolution; means over many jobs are
//! still telling.

use std::collections::HashMap;

use sqlx::AssertSqlSafe;

use crate::db::Db;
use crate::load::percentile;

/// The segments of one job, in order.
const SEGMENTS: [&str; 8] = [
    "created→started",
    "started→1st call",
    "panel calls",
    "save panel→analysis call",
    "analysis call",
    "save analysis→final call",
    "final call",
    "final answer→finished",
];

#[derive(Default)]
struct JobTimes {
    created: i64,
    started: i64,
    finished: i64,
    /// (call start, call end) per panel member.
    panel: Vec<(i64, i64)>,
    analysis: Option<(i64, i64)>,
    final_: Option<(i64, i64)>,
}

impl JobTimes {
    fn segments(&self) -> Option<[f64; 8]> {
        let (a, f) = (self.analysis?, self.final_?);
        let first = self.panel.iter().map(|p| p.0).min()?;
        let last = self.panel.iter().map(|p| p.1).max()?;
        let s = [
            self.started - self.created,
            first - self.started,
            last - first,
            a.0 - last,
            a.1 - a.0,
            f.0 - a.1,
            f.1 - f.0,
            self.finished - f.1,
        ];
        Some(s.map(|v| v as f64))
    }
}

/// Mean and p99 (ms) of each segment over the succeeded jobs created in `[since, until)`, as
/// one line; `None` when there are none.
pub async fn summary(db: &Db, since: i64, until: i64) -> anyhow::Result<Option<String>> {
    let sql = format!(
        "SELECT CAST(s.job_id AS TEXT), s.step, s.created_at, s.latency_ms, j.created_at, \
         j.started_at, j.finished_at FROM steps s JOIN jobs j ON j.id = s.job_id \
         WHERE j.status = 'succeeded' AND j.created_at >= {since} AND j.created_at < {until}"
    );
    type Row = (String, String, i64, i64, i64, i64, i64);
    let rows: Vec<Row> = match db {
        Db::Sqlite(p) => sqlx::query_as(AssertSqlSafe(sql)).fetch_all(p).await?,
        Db::Pg(p) => sqlx::query_as(AssertSqlSafe(sql)).fetch_all(p).await?,
    };
    let mut jobs: HashMap<String, JobTimes> = HashMap::new();
    for (id, step, done, latency, created, started, finished) in rows {
        let job = jobs.entry(id).or_default();
        (job.created, job.started, job.finished) = (created, started, finished);
        let call = (done - latency, done);
        match step.as_str() {
            "analysis" => job.analysis = Some(call),
            "final" => job.final_ = Some(call),
            _ => job.panel.push(call),
        }
    }
    let per_job: Vec<[f64; 8]> = jobs.values().filter_map(JobTimes::segments).collect();
    if per_job.is_empty() {
        return Ok(None);
    }
    let parts: Vec<String> = SEGMENTS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let v: Vec<f64> = per_job.iter().map(|s| s[i]).collect();
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            format!("{name} {mean:.1}/{:.0}", percentile(&v, 99.0))
        })
        .collect();
    Ok(Some(format!(
        "{} jobs, mean/p99 ms: {}",
        per_job.len(),
        parts.join(" · ")
    )))
}
