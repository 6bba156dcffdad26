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
    let file = match &cli.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let fusion = file.resolve(&|k| std::env::var(k).ok())?;
    let store = cli.store_options();
    let command = cli
        .command
        .unwrap_or_else(|| Command::Serve(ServeArgs::default()));
    let settings = match command {
        Command::Migrate => {
            app::open_store(&cli.database_url, store).await?;
            println!("migrations applied");
            return Ok(());
        }
        Command::Serve(args) => Settings {
            store,
            database_url: cli.database_url,
            listen: Some(args.listen),
            fusion,
            // `--concurrency 0`: the API alone, with the jobs left to `fusion worker` processes.
            worker: match args.worker.concurrency {
                0 => None,
                _ => Some(args.worker.to_config()?),
            },
        },
        Command::Worker(args) => Settings {
            store,
            database_url: cli.database_url,
            listen: None,
            fusion,
            worker: Some(args.to_config()?),
        },
    };
    let app = Application::build(settings).await?;
    app.run(app::shutdown_signal()).await
}
