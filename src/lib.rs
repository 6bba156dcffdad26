//! fusion: a durable multi-model deliberation service. A request goes to a panel of models in
//! parallel, an analyst compares their answers, and a final answer is written from that
//! analysis — every step a checkpoint in SQLite or Postgres, so runs survive crashes and retries.
//!
//! # Layout
//! - `api/` — HTTP endpoints (axum); requests become domain values at the edge.
//! - `store/` — the durable queue: one trait, SQLite and Postgres implementations.
//! - `worker/` — claims jobs, holds leases, runs the pipeline, writes outcomes.
//! - `fusion/` — the workflow (panel → analysis → final), its prompts and analysis schema.
//! - `upstream/` — OpenAI-compatible calls, error classification, retries.
//! - `job.rs` — the domain types every layer shares; `config.rs`, `clock.rs`, `app.rs` wiring.
//! - `redact.rs` — URLs with their credentials hidden, for logs, errors and `Debug`.
//! - `serve.rs` — the HTTP server loop, with hyper's time limits on reading a request's head.

pub mod api;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod fusion;
pub mod job;
pub mod redact;
pub mod serve;
pub mod store;
#[doc(hidden)]
pub mod testing;
pub mod upstream;
pub mod worker;

/// The largest panel a job may ask for.
pub const MAX_PANEL: usize = 8;

/// `bytes` in lowercase hex (a digest as it is shown and stored).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
