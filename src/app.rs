//! Wiring: build the store, upstream client, pipeline, worker and HTTP server from settings, and
//! run them until a shutdown signal. The listener is bound first: tests can ask for port 0 and
//! read the real port back, and a port already taken stops the start before any migration.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::clock::{AlignedClock, Offset, SharedClock, SystemClock};
use crate::config::FusionConfig;
use crate::fusion::Pipeline;
use crate::redact::redact_url;
use crate::store::{self, Store, StoreOptions};
use crate::upstream::Upstream;
use crate::worker::{Worker, WorkerConfig};

/// What to run in this process.
#[derive(Clone)]
pub struct Settings {
    pub database_url: String,
    pub store: StoreOptions,
    /// `None`: workers only, no HTTP server.
    pub listen: Option<String>,
    pub fusion: FusionConfig,
    /// `None`: no workers (API only).
    pub worker: Option<WorkerConfig>,
}

/// The database URL's password hidden (`redact_url`): settings logged or shown in a panic
/// message must not carry it.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &redact_url(&self.database_url))
            .field("store", &self.store)
            .field("listen", &self.listen)
            .field("fusion", &self.fusion)
            .field("worker", &self.worker)
            .finish()
    }
}

pub struct Application {
    addr: Option<SocketAddr>,
    listener: Option<TcpListener>,
    state: AppState,
    worker: Option<Arc<Worker>>,
    /// This process's clock, when aligned with the database's, and what was said of its skew.
    aligned: Option<(Arc<AlignedClock>, SkewReport)>,
}

/// Open the store and apply migrations, retrying while the database is starting up or out of
/// reach for now, or a migration cannot take its lock (`StoreError::may_pass_at_start`). Any
/// other failure (a refused password, a database that does not exist, a migration this build
/// does not know) stops the start at once, saying why.
pub async fn open_store(url: &str, options: StoreOptions) -> anyhow::Result<Arc<dyn Store>> {
    let mut failures = 0;
    loop {
        let attempt = async {
            let store = store::connect_with(url, options).await?;
            store.migrate().await?;
            Ok::<_, store::StoreError>(store)
        };
        match attempt.await {
            Ok(store) => return Ok(store),
            Err(e) if failures < 10 && e.may_pass_at_start() => {
                failures += 1;
                tracing::warn!(error = %e, url = %redact_url(url), "could not open or migrate the database; retrying");
                tokio::time::sleep(Duration::from_millis(500 * failures)).await;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("Failed to open the database {}", redact_url(url)));
            }
        }
    }
}

impl Application {
    /// Bind the listener, then open and migrate the store: a port already taken (an older
    /// process still serving, say) stops the start before a migration the older process may
    /// not run beside.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let port = reserve(settings.listen.as_deref()).await?;
        let store = open_store(&settings.database_url, settings.store).await?;
        Application::build_with(settings, store, Arc::new(SystemClock), port).await
    }

    /// `build` on a store opened (and migrated) already, with this host's clock given:
    /// `settings.database_url` and `settings.store` are not used. Tests pass a store wrapped to
    /// inject faults, or a clock that is off. On a store with a clock of its own (Postgres) the
    /// process's clock is aligned with it before any job runs, and again every `REALIGN_EVERY`
    /// while it runs.
    pub async fn build_on(
        settings: Settings,
        store: Arc<dyn Store>,
        host_clock: SharedClock,
    ) -> anyhow::Result<Application> {
        let port = reserve(settings.listen.as_deref()).await?;
        Application::build_with(settings, store, host_clock, port).await
    }

    /// The application on `store`, listening on `port` (reserved) once everything is built.
    async fn build_with(
        settings: Settings,
        store: Arc<dyn Store>,
        host_clock: SharedClock,
        port: Option<TcpSocket>,
    ) -> anyhow::Result<Application> {
        let aligned = Arc::new(AlignedClock::new(host_clock));
        let clock: SharedClock = aligned.clone();
        let aligned = match first_alignment(&aligned, store.as_ref()).await? {
            None => None,
            Some(offset) => {
                let mut skew = SkewReport::default();
                skew.saw(offset);
                Some((aligned, skew))
            }
        };
        let jobs_in_flight = settings.worker.as_ref().map_or(0, |w| w.concurrency);
        let upstream_config = settings
            .fusion
            .upstream
            .clone()
            .for_jobs_in_flight(jobs_in_flight);
        let upstream = Arc::new(Upstream::new(upstream_config)?.with_clock(clock.clone()));
        let pipeline = Arc::new(Pipeline::new(
            &settings.fusion,
            upstream.clone(),
            clock.clone(),
        ));
        let worker = settings
            .worker
            .map(|cfg| Worker::new(store.clone(), pipeline, clock.clone(), cfg));
        let state = AppState::new(
            store,
            Arc::new(settings.fusion),
            clock,
            upstream,
            worker.clone(),
        );
        // Connections are taken from here on: before, a client would wait in the backlog of a
        // process still opening its database, rather than be refused.
        let listener = port.map(|p| p.listen(LISTEN_BACKLOG)).transpose()?;
        let addr = listener.as_ref().map(TcpListener::local_addr).transpose()?;
        Ok(Application {
            addr,
            listener,
            state,
            worker,
            aligned,
        })
    }

    /// The bound port, when serving HTTP.
    pub fn port(&self) -> Option<u16> {
        self.addr.map(|a| a.port())
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.state.store.clone()
    }

    /// Serve and work until `shutdown` fires; then stop accepting, drain, release.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        if let Some((aligned, skew)) = self.aligned {
            let store = self.state.store.clone();
            tokio::spawn(keep_aligned(aligned, skew, store, shutdown.clone()));
        }
        let worker = self.worker.map(|w| tokio::spawn(w.run(shutdown.clone())));
        // Requests waiting on jobs stop waiting once this process has stopped working: its
        // worker handed back what it ran (or, with no worker here, at shutdown). Otherwise a
        // client waiting on a job handed back to the queue would hold the server open forever.
        let watch = self.state.watch.clone();
        let stopped = shutdown.clone();
        let handed_back = CancellationToken::new();
        let done = handed_back.clone();
        let worker = tokio::spawn(async move {
            let ran = match worker {
                Some(w) => Some(w.await),
                None => {
                    stopped.cancelled().await;
                    None
                }
            };
            watch.close();
            done.cancel();
            ran
        });
        if let Some(listener) = self.listener {
            tracing::info!(addr = ?self.addr, "listening");
            let app = api::router(self.state);
            let stop = shutdown.clone();
            let serve = crate::serve::serve(
                listener,
                app,
                crate::serve::HEADER_READ_TIMEOUT,
                async move { stop.cancelled().await },
            );
            // Graceful shutdown waits for every open request, without end; the ones waiting on
            // jobs are answered once the worker has handed its jobs back, but a relayed answer
            // (a stream through the gateway: up to a day) or a fusion tool's outer call waits
            // on an upstream. Those get `OPEN_REQUESTS_DRAIN` more, then are cut, or one
            // client's stream held the process up long past SIGTERM.
            let cut = async {
                handed_back.cancelled().await;
                tokio::time::sleep(OPEN_REQUESTS_DRAIN).await;
            };
            tokio::select! {
                () = serve => {}
                () = cut => tracing::warn!(
                    "requests still open {} s after shutdown's hand-back (relayed answers, \
                     fusion tool calls) are cut",
                    OPEN_REQUESTS_DRAIN.as_secs()
                ),
            }
        } else {
            shutdown.cancelled().await;
        }
        if let Some(ran) = worker.await.context("shutdown task panicked")? {
            ran.context("worker task panicked")?;
        }
        Ok(())
    }
}

/// How long requests still open once shutdown has handed the jobs back get to finish (see
/// `Application::run`).
const OPEN_REQUESTS_DRAIN: Duration = Duration::from_secs(5);

/// How often a process re-reads the database's clock: the host's time since boot, which
/// carries the database's time between readings, drifts from it by milliseconds a minute at
/// most (the readings allow for 100 ppm, 6 ms a minute).
const REALIGN_EVERY: Duration = Duration::from_secs(60);

/// How many times the first reading of the database's clock is tried before the start fails.
const FIRST_ALIGNMENT_TRIES: u32 = 5;

/// Align `clock` with the store's before any job runs: `None` when the store has no clock of
/// its own (SQLite). A store that cannot tell its time after a few tries fails the start, since
/// running on the host's own clock is what alignment is there to prevent.
async fn first_alignment(
    clock: &AlignedClock,
    store: &dyn Store,
) -> anyhow::Result<Option<Offset>> {
    let mut tries = 1;
    loop {
        match clock.align(store).await {
            Ok(measured) => return Ok(measured),
            Err(e) if tries < FIRST_ALIGNMENT_TRIES => {
                tracing::warn!(error = %e, "could not read the database's clock; trying again");
                tokio::time::sleep(Duration::from_millis(250) * tries).await;
                tries += 1;
            }
            Err(e) => {
                return Err(e).context(
                    "could not read the database's clock, which this process's clock follows",
                );
            }
        }
    }
}

async fn keep_aligned(
    aligned: Arc<AlignedClock>,
    mut skew: SkewReport,
    store: Arc<dyn Store>,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(REALIGN_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match aligned.align(store.as_ref()).await {
            Ok(Some(offset)) => skew.saw(offset),
            Ok(None) => return,
            Err(e) => tracing::warn!(error = %e,
                "could not read the database's clock; going on from the last reading"),
        }
    }
}

/// An offset from the database's clock past which the host's clock is reported as off: it is
/// followed either way, but the rest of the host (its logs, other software) is not.
const OFF_BY_MS: i64 = 1_000;

/// What was last said of the host's clock: warned of when it is more than `OFF_BY_MS` off the
/// database's, and again when that changes by more than `OFF_BY_MS`, however slowly.
#[derive(Debug, Default)]
struct SkewReport {
    /// The offset last warned of; 0 while the host's clock is within `OFF_BY_MS`.
    warned_ms: i64,
}

impl SkewReport {
    fn saw(&mut self, offset: Offset) {
        let off = offset.offset_ms;
        if off.abs() <= OFF_BY_MS {
            if self.warned_ms != 0 {
                tracing::info!(
                    offset_ms = off,
                    "this host's clock is back within 1 s of the database's"
                );
            }
            self.warned_ms = 0;
        } else if (off - self.warned_ms).abs() > OFF_BY_MS {
            tracing::warn!(
                offset_ms = off,
                uncertainty_ms = offset.uncertainty_ms,
                "this host's clock is {:.1} s {} the database's; fusion's times (leases, \
                 deadlines, timestamps) follow the database's clock, the rest of this host \
                 does not: check its time synchronisation",
                off.abs() as f64 / 1000.0,
                if off > 0 { "behind" } else { "ahead of" },
            );
            self.warned_ms = off;
        }
    }
}

/// Pending connections the listener holds (as tokio's `TcpListener::bind`).
const LISTEN_BACKLOG: u32 = 1024;

/// The port `listen` names, bound but not listening yet: a port another process listens on
/// fails here, before anything else starts, while connections are refused (not left waiting)
/// until the process can serve them (`build_with`).
async fn reserve(listen: Option<&str>) -> anyhow::Result<Option<TcpSocket>> {
    let Some(listen) = listen else {
        return Ok(None);
    };
    let failed = || format!("Failed to listen on {listen}");
    let mut last = None;
    for addr in tokio::net::lookup_host(listen).await.with_context(failed)? {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .with_context(failed)?;
        // As the standard listener does on Unix: a restart need not wait out TIME_WAIT. A
        // port some process listens on is still refused; one that starts listening there
        // while this one opens its store makes `listen` fail later, after the migrations.
        #[cfg(unix)]
        socket.set_reuseaddr(true).with_context(failed)?;
        match socket.bind(addr) {
            Ok(()) => return Ok(Some(socket)),
            Err(e) => last = Some(e),
        }
    }
    let e = last.unwrap_or_else(|| std::io::Error::other("the name resolves to no address"));
    Err(e).with_context(failed)
}

/// Fires on SIGTERM or Ctrl-C. Another one, 2 s or more after the first, exits the process at
/// once (status 128 + the signal's number), without waiting out the grace period: once tokio
/// handles these signals their default (to end the process) is gone, and an operator's second
/// Ctrl-C would otherwise do nothing. One within 2 s is taken for the same request (a supervisor
/// passing a Ctrl-C on as SIGTERM). Jobs still running then wait out their leases, as after a
/// crash.
pub fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        // The signal's number.
        let mut signal = async || -> i32 {
            #[cfg(unix)]
            let number = tokio::select! {
                _ = tokio::signal::ctrl_c() => 2,
                _ = term.recv() => 15,
            };
            #[cfg(not(unix))]
            let number = {
                let _ = tokio::signal::ctrl_c().await;
                2
            };
            number
        };
        signal().await;
        let first = std::time::Instant::now();
        tracing::info!("shutdown requested; another SIGTERM or Ctrl-C exits at once");
        t.cancel();
        loop {
            let number = signal().await;
            if first.elapsed() >= Duration::from_secs(2) {
                tracing::warn!("second shutdown signal: exiting now, without the grace period");
                std::process::exit(128 + number);
            }
            tracing::info!("a signal within 2 s of the first is taken for the same request");
        }
    });
    token
}
