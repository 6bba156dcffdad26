//! Command-line interface: `serve`, `worker`, `migrate`. Every flag has an environment fallback.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::store::StoreOptions;
use crate::worker::WorkerConfig;

#[derive(Parser)]
#[command(name = "fusion", version, about = "Durable multi-model fusion service")]
pub struct Cli {
    /// Database URL: sqlite://PATH (created if missing) or postgres://…
    // `hide_env_values`: `--help` would print the variable's value, password and all.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "sqlite://fusion.db",
        global = true
    )]
    pub database_url: String,
    /// Postgres: the most database connections this process opens (its listener's included).
    /// Every `serve` and `worker` process opens up to this many, so their sum must fit the
    /// server's `max_connections`. Ignored by SQLite.
    #[arg(
        long,
        env = "FUSION_DB_MAX_CONNECTIONS",
        default_value_t = StoreOptions::default().max_connections,
        value_parser = clap::value_parser!(u32).range(i64::from(StoreOptions::MIN_CONNECTIONS)..=10_000),
        global = true
    )]
    pub db_max_connections: u32,
    /// Postgres: the longest one statement may run, lock waits included (`statement_timeout`),
    /// in seconds; 0: no limit. Writes that time out are retried. Migrations run without it.
    /// A `statement_timeout` in the URL's `options` wins. Ignored by SQLite.
    #[arg(
        long,
        env = "FUSION_DB_STATEMENT_TIMEOUT_SECONDS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(0..=86_400),
        global = true
    )]
    pub db_statement_timeout_seconds: u64,
    /// Optional TOML file with providers, presets, limits and prices.
    #[arg(long, env = "FUSION_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The database URL's password hidden (`redact_url`), as `Settings` shows it.
impl std::fmt::Debug for Cli {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cli")
            .field(
                "database_url",
                &crate::redact::redact_url(&self.database_url),
            )
            .field("db_max_connections", &self.db_max_connections)
            .field(
                "db_statement_timeout_seconds",
                &self.db_statement_timeout_seconds,
            )
            .field("config", &self.config)
            .field("command", &self.command)
            .finish()
    }
}

impl Cli {
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            max_connections: self.db_max_connections,
            statement_timeout: Some(Duration::from_secs(self.db_statement_timeout_seconds))
                .filter(|t| !t.is_zero()),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API and the workers in one process (the default).
    Serve(ServeArgs),
    /// Run workers only (scale-out against Postgres).
    Worker(WorkerArgs),
    /// Apply database migrations and exit.
    Migrate,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "FUSION_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    #[command(flatten)]
    pub worker: WorkerArgs,
}

#[derive(Debug, Args, Clone)]
pub struct WorkerArgs {
    /// Jobs run at once by this process (`serve --concurrency 0`: API only, no workers).
    #[arg(long, env = "FUSION_CONCURRENCY", default_value_t = 32)]
    pub concurrency: u32,
    /// Seconds a claimed job is held without a heartbeat before another worker may take it.
    #[arg(long, env = "FUSION_LEASE_SECONDS", default_value_t = 30)]
    pub lease_seconds: u64,
    /// Fallback poll for new jobs, in milliseconds.
    #[arg(long, env = "FUSION_POLL_MS", default_value_t = 1000)]
    pub poll_ms: u64,
    /// First wait, in milliseconds, before a job whose upstream keeps failing runs again
    /// (doubling per attempt, at most 10 minutes).
    #[arg(long, env = "FUSION_RETRY_BASE_MS", default_value_t = 30_000)]
    pub retry_base_ms: u64,
    /// On SIGTERM, seconds running jobs may go on before their leases are released (an outcome
    /// being written then gets up to 10 s more to reach the database).
    #[arg(long, env = "FUSION_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,
}

impl Default for ServeArgs {
    fn default() -> Self {
        ServeArgs::parse_from_env_defaults()
    }
}

impl ServeArgs {
    fn parse_from_env_defaults() -> ServeArgs {
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            serve: ServeArgs,
        }
        Wrapper::parse_from(["fusion"]).serve
    }
}

/// The longest lease: how long a dead worker's jobs may wait before they are rescued. (A lease
/// beyond the clock's range would overflow its expiry.)
const MAX_LEASE_SECONDS: u64 = 7 * 86_400;

impl WorkerArgs {
    pub fn to_config(&self) -> anyhow::Result<WorkerConfig> {
        anyhow::ensure!(self.concurrency >= 1, "--concurrency must be at least 1");
        self.check_flags()?;
        Ok(WorkerConfig {
            concurrency: self.concurrency,
            lease: Duration::from_secs(self.lease_seconds),
            poll_interval: Duration::from_millis(self.poll_ms),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
            retry_base: Duration::from_millis(self.retry_base_ms),
            ..WorkerConfig::default()
        })
    }

    /// Every flag but `--concurrency` in its range.
    pub fn check_flags(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=MAX_LEASE_SECONDS).contains(&self.lease_seconds),
            "--lease-seconds must be from 1 to {MAX_LEASE_SECONDS} (7 days), got {}",
            self.lease_seconds
        );
        // Out of these ranges a value cannot work as meant: a poll under 10 ms spins, a requeue
        // wait of 0 runs a failing job's attempts back to back (its upstream's 429s unheeded).
        for (flag, value, (min, max)) in [
            ("--poll-ms", self.poll_ms, (10, 3_600_000)),
            ("--retry-base-ms", self.retry_base_ms, (1, 600_000)),
            (
                "--shutdown-grace-seconds",
                self.shutdown_grace_seconds,
                (0, 86_400),
            ),
        ] {
            anyhow::ensure!(
                (min..=max).contains(&value),
                "{flag} must be from {min} to {max}, got {value}"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The database URL's password is not shown by `Debug` (a log line or a panic message that
    // prints the command line's settings); the user and host are. Before, it was shown whole.
    #[test]
    fn debug_hides_the_database_password() {
        let url = "postgres://fusion:s3cret@db.example/fusion";
        let cli = Cli::try_parse_from(["fusion", "--database-url", url, "migrate"]).unwrap();
        let shown = format!("{cli:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("postgres://fusion:***@db.example/fusion"),
            "{shown}"
        );
        let settings = crate::app::Settings {
            database_url: url.into(),
            store: StoreOptions::default(),
            listen: None,
            fusion: crate::config::FileConfig::default()
                .resolve(&|_| None)
                .unwrap(),
            worker: None,
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("postgres://fusion:***@db.example/fusion"),
            "{shown}"
        );
    }

    #[test]
    fn a_lease_must_fit_the_clock() {
        let config =
            |secs: &str| match Cli::try_parse_from(["fusion", "worker", "--lease-seconds", secs]) {
                Ok(Cli {
                    command: Some(Command::Worker(args)),
                    ..
                }) => args.to_config().map_err(|e| e.to_string()),
                other => panic!("{:?}", other.map(|_| ())),
            };
        let lease = config("604800").unwrap().lease;
        assert_eq!(lease, Duration::from_secs(604_800));
        for bad in ["0", "604801", "18446744073709551615"] {
            let err = config(bad).unwrap_err();
            assert!(
                err.contains("--lease-seconds must be from 1 to 604800") && err.contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn the_workers_timings_are_checked_naming_the_flag() {
        let config = |flag: &str, value: &str| match Cli::try_parse_from([
            "fusion", "worker", flag, value,
        ]) {
            Ok(Cli {
                command: Some(Command::Worker(args)),
                ..
            }) => args.to_config().map_err(|e| e.to_string()),
            other => panic!("{:?}", other.map(|_| ())),
        };
        for (flag, bad, range) in [
            ("--poll-ms", "9", "10 to 3600000"),
            ("--poll-ms", "3600001", "10 to 3600000"),
            ("--retry-base-ms", "0", "1 to 600000"),
            ("--retry-base-ms", "600001", "1 to 600000"),
            ("--shutdown-grace-seconds", "86401", "0 to 86400"),
        ] {
            let err = config(flag, bad).unwrap_err();
            assert_eq!(err, format!("{flag} must be from {range}, got {bad}"));
        }
        let ok = config("--poll-ms", "10").unwrap();
        assert_eq!(ok.poll_interval, Duration::from_millis(10));
        let ok = config("--retry-base-ms", "1").unwrap();
        assert_eq!(ok.retry_base, Duration::from_millis(1));
        let ok = config("--shutdown-grace-seconds", "0").unwrap();
        assert_eq!(ok.shutdown_grace, Duration::ZERO);
    }

    #[test]
    fn the_postgres_pool_size_and_statement_timeout_are_flags() {
        let cli = Cli::try_parse_from(["fusion", "--db-max-connections", "5", "migrate"]).unwrap();
        assert_eq!(cli.store_options().max_connections, 5);
        let cli = Cli::try_parse_from(["fusion", "migrate"]).unwrap();
        assert_eq!(cli.store_options(), StoreOptions::default());

        let cli = Cli::try_parse_from(["fusion", "--db-statement-timeout-seconds", "0", "migrate"]);
        assert_eq!(cli.unwrap().store_options().statement_timeout, None);
        let cli = Cli::try_parse_from(["fusion", "--db-statement-timeout-seconds", "5", "migrate"]);
        assert_eq!(
            cli.unwrap().store_options().statement_timeout,
            Some(Duration::from_secs(5))
        );

        let err = Cli::try_parse_from(["fusion", "--db-max-connections", "2", "migrate"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("invalid value '2' for '--db-max-connections") && err.contains("3..="),
            "{err}"
        );
    }
}
