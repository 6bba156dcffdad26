//! The `fusion` binary: parse the command line, set up logging, run the chosen command.

use clap::Parser;
use tracing_subscriber::EnvFilter;

use fusion::app::{self, Application, Settings};
use fusion::cli::{Cli, Command, ServeArgs};
use fusion::config::FileConfig;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn")),
        )
        .init();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let store = cli.store_options();
    let command = cli
        .command
        .unwrap_or_else(|| Command::Serve(ServeArgs::default()));
    // The upstream, presets and prices are the jobs' settings: `migrate` neither needs nor
    // checks them (a bad upstream URL does not stop a migration, nor does a missing key warn).
    let fusion = || {
        let file = match &cli.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        // A variable set to the empty string is not set (a compose file's `${VAR:-}`).
        file.resolve(&|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    };
    let settings = match command {
        Command::Migrate => {
            app::open_store(&cli.database_url, store).await?;
            println!("migrations applied");
            return Ok(());
        }
        Command::Serve(args) => Settings {
            store,
            listen: Some(args.listen),
            fusion: fusion()?,
            database_url: cli.database_url,
            // `--concurrency 0`: the API alone, with the jobs left to `fusion worker` processes
            // (its other worker flags are checked all the same: a typo should not wait for the
            // day the flag is used).
            worker: match args.worker.concurrency {
                0 => args.worker.check_flags().map(|()| None)?,
                _ => Some(args.worker.to_config()?),
            },
        },
        Command::Worker(args) => Settings {
            store,
            listen: None,
            fusion: fusion()?,
            database_url: cli.database_url,
            worker: Some(args.to_config()?),
        },
    };
    let app = Application::build(settings).await?;
    app.run(app::shutdown_signal()).await
}
