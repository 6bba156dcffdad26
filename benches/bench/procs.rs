//! The `fusion serve` child process, and what `/proc` tells about processes: peak and current
//! RSS, open files, and CPU time (the server's, the fake's, Postgres's and the harness's own),
//! so a figure can be split into where the CPU went.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

/// How a server is started.
#[derive(Debug, Clone)]
pub struct ServerOpts {
    /// `FUSION_CONCURRENCY`; 0 runs the API alone.
    pub concurrency: u32,
    pub lease_seconds: u64,
}

impl Default for ServerOpts {
    fn default() -> Self {
        ServerOpts {
            concurrency: 64,
            lease_seconds: 30,
        }
    }
}

/// A `fusion serve` child process; killed on drop.
pub struct Server {
    child: Child,
    pub pid: u32,
    /// `http://127.0.0.1:PORT`
    pub address: String,
    /// Its stderr (logs at `warn`).
    pub log: PathBuf,
}

impl Server {
    /// Start and wait until `/readyz` answers 200 (at most 30 s).
    pub async fn start(
        ctx: &crate::Ctx,
        database_url: &str,
        upstream: &str,
        opts: &ServerOpts,
    ) -> anyhow::Result<Server> {
        let port = free_port()?;
        let log = ctx
            .dir
            .path()
            .join(format!("server-{}.log", uuid::Uuid::now_v7().simple()));
        let mut child = Command::new(&ctx.fusion)
            .arg("serve")
            .env("DATABASE_URL", database_url)
            .env("FUSION_LISTEN", format!("127.0.0.1:{port}"))
            .env("FUSION_UPSTREAM_URL", upstream)
            .env("FUSION_CONCURRENCY", opts.concurrency.to_string())
            .env("FUSION_LEASE_SECONDS", opts.lease_seconds.to_string())
            .env("FUSION_SHUTDOWN_GRACE_SECONDS", "5")
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .env_remove("FUSION_CONFIG")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("all_proxy")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", ctx.fusion.display()))?;
        let address = format!("http://127.0.0.1:{port}");
        let http = crate::load::client(2);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("fusion serve exited with {status}: {}", tail(&log));
            }
            if let Ok(r) = http.get(format!("{address}/readyz")).send().await
                && r.status() == 200
            {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "fusion serve not ready after 30 s: {}",
                tail(&log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Server {
            pid: child.id().context("server pid")?,
            child,
            address,
            log,
        })
    }

    /// SIGTERM, then wait (at most 30 s) for a graceful exit.
    pub async fn terminate(mut self) -> anyhow::Result<()> {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()?;
        anyhow::ensure!(sent.success(), "kill -TERM failed");
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                anyhow::ensure!(status.success(), "fusion exited with {status}");
                Ok(())
            }
            Err(_) => {
                let _ = self.child.start_kill();
                anyhow::bail!("fusion did not exit within 30 s of SIGTERM")
            }
        }
    }

    /// SIGKILL: nothing runs on the way out; leases stay behind. Returns when it is gone.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Lines the server logged at WARN or ERROR so far.
    pub fn problems(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(str::to_string)
            .collect()
    }
}

/// The end of a log, for error messages.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A `kB` field of `/proc/PID/status` (`VmHWM`, `VmRSS`), in MiB.
pub fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{field}:")))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Open file descriptors of a process (sockets included).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// User + system CPU time of a process so far, in clock ticks.
fn cpu_ticks(stat_path: &Path) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(stat_path).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_string();
    let fields: Vec<&str> = text[close + 2..].split_whitespace().collect();
    // After the command: state is field 3 of the whole line, utime 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// CPU time (clock ticks) of the processes that share the machine during a run; Postgres's per
/// process, so that a backend that started between two samples counts from its start and one
/// that ended takes nothing away (what it spent before it ended is not seen).
#[derive(Debug, Clone, Default)]
pub struct Cpu {
    pub server: u64,
    pub fake: u64,
    pub postgres: HashMap<u32, u64>,
    pub harness: u64,
}

impl Cpu {
    pub fn sample(server: u32, fake: u32) -> Cpu {
        let of = |pid: u32| cpu_ticks(&PathBuf::from(format!("/proc/{pid}/stat"))).map(|c| c.1);
        let postgres = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                let (comm, ticks) = cpu_ticks(&e.path().join("stat"))?;
                (comm == "postgres" || comm.starts_with("postgres:")).then_some((pid, ticks))
            })
            .collect();
        Cpu {
            server: of(server).unwrap_or(0),
            fake: of(fake).unwrap_or(0),
            postgres,
            harness: cpu_ticks(Path::new("/proc/self/stat")).map_or(0, |c| c.1),
        }
    }

    /// Milliseconds of CPU per unit of work between two samples: (server, fake, postgres,
    /// harness).
    pub fn ms_per(&self, later: &Cpu, units: f64) -> [f64; 4] {
        let tick_ms = 1000.0 / clock_ticks_per_second();
        let d = |a: u64, b: u64| b.saturating_sub(a) as f64 * tick_ms / units.max(1.0);
        [
            d(self.server, later.server),
            d(self.fake, later.fake),
            later
                .postgres
                .iter()
                .map(|(pid, t)| t.saturating_sub(self.postgres.get(pid).copied().unwrap_or(0)))
                .sum::<u64>() as f64
                * tick_ms
                / units.max(1.0),
            d(self.harness, later.harness),
        ]
    }
}

/// Median time (µs) of an 8 KiB write + `fdatasync` of a file in `dir`, over at most 200
/// rounds or 1 s: what one durable commit costs on this disk right now. On a shared virtual
/// disk it varies by 30× with other I/O, and Postgres (which flushes per commit) with it.
pub fn flush_latency_us(dir: &Path) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("flush-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = [7u8; 8192];
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < 200 && started.elapsed() < Duration::from_secs(1) {
        let t = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    std::fs::remove_file(&path)?;
    Ok(crate::load::percentile(&times, 50.0))
}

/// CPU ticks so far of each thread of a process: thread id → (name, ticks).
pub fn threads(pid: u32) -> HashMap<u32, (String, u64)> {
    tasks(pid)
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            Some((tid, cpu_ticks(&e.path().join("stat"))?))
        })
        .collect()
}

/// Context switches so far (voluntary and not) of all the threads of a process: each one is a
/// thread that slept and was woken, or was preempted.
pub fn context_switches(pid: u32) -> u64 {
    let per_thread = |path: PathBuf| -> u64 {
        let text = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum()
    };
    tasks(pid).map(|e| per_thread(e.path())).sum()
}

/// The entries of `/proc/PID/task`, one per thread (none once the process is gone).
fn tasks(pid: u32) -> impl Iterator<Item = std::fs::DirEntry> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
}

/// The `top` busiest threads between two `threads` samples, as "name N%" of one core over
/// `secs` seconds.
pub fn busiest_threads(
    before: &HashMap<u32, (String, u64)>,
    after: &HashMap<u32, (String, u64)>,
    secs: f64,
    top: usize,
) -> String {
    let tick_s = 1.0 / clock_ticks_per_second();
    let mut busy: Vec<(String, f64)> = after
        .iter()
        .map(|(tid, (name, t))| {
            let t0 = before.get(tid).map_or(0, |b| b.1);
            (
                name.clone(),
                t.saturating_sub(t0) as f64 * tick_s / secs * 100.0,
            )
        })
        .collect();
    busy.sort_by(|a, b| b.1.total_cmp(&a.1));
    busy.truncate(top);
    let shown: Vec<String> = busy
        .iter()
        .map(|(n, pct)| format!("{n} {pct:.0}%"))
        .collect();
    shown.join(", ")
}

/// `getconf CLK_TCK` (100 on Linux in practice).
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
