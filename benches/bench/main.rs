//! The benchmark harness: the real `fusion serve` binary, run as a child process against a fake
//! OpenAI-compatible upstream in another child process (this binary again, `fake-upstream`), on
//! SQLite and on Postgres. Five scenarios (overhead, throughput, memory, recovery, enqueue), one
//! table. Every figure is a ratio or a count measured within one run, so it holds on a noisy
//! machine. See BENCHMARKS.md for what each figure means and the last table.
//!
//! ```sh
//! cargo bench --bench bench                      # full run, both stores (Postgres needs TEST_DATABASE_URL)
//! cargo bench --bench bench -- --quick           # a few seconds, every code path, figures not meaningful
//! cargo test --bench bench -- --quick            # the same on the debug build (what CI runs)
//! ```
//!
//! `cargo bench` builds `fusion` with the release profile into `target/release/fusion` before it
//! runs this harness (a benchmark's binaries are always built first), so the binary measured is
//! always the current source; `--fusion PATH` measures another one.

#[allow(dead_code)]
#[path = "../../tests/api/fake_upstream.rs"]
mod fake_upstream;

mod breakdown;
mod db;
mod fake;
mod load;
mod memory;
mod overhead;
mod procs;
mod recovery;
mod report;
mod throughput;

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand};

use db::StoreKind;
use report::Report;

#[derive(Debug, Parser)]
#[command(name = "bench", about = "fusion benchmark harness")]
struct Cli {
    /// A few seconds per store: small sizes, every code path; figures are not meaningful.
    #[arg(long)]
    quick: bool,
    /// Stores to run, comma-separated (`sqlite`, `postgres`). Postgres uses TEST_DATABASE_URL
    /// and is skipped with a note when it is not set.
    #[arg(long, default_value = "sqlite,postgres", value_delimiter = ',')]
    stores: Vec<String>,
    /// Scenarios to run, comma-separated (`overhead`, `throughput`, `memory`, `recovery`);
    /// `throughput` includes the enqueue figures.
    #[arg(
        long,
        default_value = "overhead,throughput,memory,recovery",
        value_delimiter = ','
    )]
    only: Vec<String>,
    /// The `fusion` binary to measure (default: the one cargo built beside this harness).
    #[arg(long)]
    fusion: Option<PathBuf>,
    /// Override: jobs the drain server runs at once (`FUSION_CONCURRENCY`).
    #[arg(long)]
    drain_concurrency: Option<u32>,
    /// Override: the steady producer's rate, jobs/s.
    #[arg(long)]
    steady_rate: Option<u32>,
    /// Override: jobs enqueued (and then drained).
    #[arg(long)]
    enqueue_jobs: Option<usize>,
    /// Also write the table (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the fake upstream (used by the harness itself, in a child process).
    #[command(hide = true)]
    FakeUpstream {
        /// JSON file with the delays to script (see `fake::Script`).
        #[arg(long)]
        script: PathBuf,
    },
}

/// Sizes of every scenario: the full run, or `--quick`.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub overhead_jobs: usize,
    pub overhead_clients: usize,
    pub enqueue_jobs: usize,
    pub enqueue_conns: usize,
    pub drain_concurrency: u32,
    pub steady_rate: u32,
    pub steady_secs: u64,
    pub blast_secs: f64,
    pub blast_conns: usize,
    pub memory_jobs: usize,
    pub memory_upstream_ms: u64,
    pub recovery_jobs: usize,
    pub recovery_lease_s: u64,
}

impl Sizes {
    fn full() -> Sizes {
        Sizes {
            overhead_jobs: 200,
            overhead_clients: 20,
            enqueue_jobs: 10_000,
            enqueue_conns: 32,
            // Jobs in flight in the drain and steady server (`FUSION_CONCURRENCY`): 128, 256 and
            // 512 gave 2,289 / 2,424 / 2,137 jobs/s on SQLite and 1,548 / 1,545 / 1,352 on
            // Postgres (64: ~1,800 and ~1,450); bigger batches, fewer statements per job.
            drain_concurrency: 256,
            steady_rate: 1100,
            steady_secs: 10,
            blast_secs: 3.0,
            blast_conns: 64,
            memory_jobs: 2000,
            memory_upstream_ms: 20_000,
            recovery_jobs: 500,
            recovery_lease_s: 2,
        }
    }

    fn quick() -> Sizes {
        Sizes {
            overhead_jobs: 10,
            overhead_clients: 10,
            enqueue_jobs: 150,
            enqueue_conns: 32,
            drain_concurrency: 64,
            steady_rate: 100,
            steady_secs: 1,
            blast_secs: 0.3,
            blast_conns: 32,
            memory_jobs: 100,
            memory_upstream_ms: 2000,
            recovery_jobs: 30,
            recovery_lease_s: 1,
        }
    }
}

/// What every scenario needs.
pub struct Ctx {
    pub fusion: PathBuf,
    pub sizes: Sizes,
    pub quick: bool,
    /// Scratch space for SQLite files, scripts and server logs.
    pub dir: tempfile::TempDir,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = match cli.command {
        Some(Command::FakeUpstream { script }) => rt.block_on(fake::serve(&script)),
        None => rt.block_on(run(cli)),
    };
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Run every selected scenario on every selected store; print the table. `Ok(false)` when a
/// correctness check failed (a job failed, a checkpointed step was called again, a timeout).
async fn run(cli: Cli) -> anyhow::Result<bool> {
    let started = Instant::now();
    let fusion = cli
        .fusion
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fusion")));
    anyhow::ensure!(
        fusion.exists(),
        "{} does not exist: run through `cargo bench --bench bench` (which builds it) or pass --fusion",
        fusion.display()
    );
    let mut sizes = if cli.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    sizes.drain_concurrency = cli.drain_concurrency.unwrap_or(sizes.drain_concurrency);
    sizes.steady_rate = cli.steady_rate.unwrap_or(sizes.steady_rate);
    sizes.enqueue_jobs = cli.enqueue_jobs.unwrap_or(sizes.enqueue_jobs);
    let ctx = Ctx {
        fusion,
        sizes,
        quick: cli.quick,
        dir: tempfile::Builder::new().prefix("fusion-bench").tempdir()?,
    };
    eprintln!(
        "bench: measuring {} ({} run)",
        ctx.fusion.display(),
        if ctx.quick { "quick" } else { "full" }
    );
    let mut report = Report::default();
    for name in &cli.stores {
        let Some(kind) = StoreKind::parse(name) else {
            anyhow::bail!("unknown store `{name}`: use sqlite or postgres");
        };
        if kind == StoreKind::Postgres && std::env::var("TEST_DATABASE_URL").is_err() {
            // In CI (as in the test suite), a missing prerequisite fails instead of skipping.
            if std::env::var_os("CI").is_some() {
                let error = "CI is set but TEST_DATABASE_URL is not: Postgres was not measured";
                report.errors.push(error.to_string());
                continue;
            }
            let note = "Postgres skipped: TEST_DATABASE_URL is not set";
            eprintln!("bench: {note}");
            report.notes.push(note.to_string());
            continue;
        }
        report.stores.push(kind);
        for scenario in &cli.only {
            let t = Instant::now();
            eprintln!("bench: [{}] {scenario} ...", kind.name());
            // Each scenario gets a fresh database (or SQLite file), removed whatever happened.
            let target = match db::Target::create(&ctx, kind).await {
                Ok(target) => target,
                Err(e) => {
                    report.fail(kind, scenario, &e);
                    continue;
                }
            };
            let figures = match scenario.as_str() {
                "overhead" => overhead::measure(&ctx, &target).await,
                "throughput" => throughput::measure(&ctx, &target).await,
                "memory" => memory::measure(&ctx, &target).await,
                "recovery" => recovery::measure(&ctx, &target).await,
                other => Err(anyhow::anyhow!("unknown scenario `{other}`")),
            };
            drop(target);
            match figures {
                Ok(figures) => report.add(kind, figures),
                Err(e) => report.fail(kind, scenario, &e),
            }
            eprintln!(
                "bench: [{}] {scenario} done in {:.1} s",
                kind.name(),
                t.elapsed().as_secs_f64()
            );
        }
    }
    let table = report.markdown(ctx.quick, started.elapsed());
    println!("{table}");
    if let Some(path) = &cli.out {
        std::fs::write(path, &table)?;
    }
    Ok(report.errors.is_empty())
}
