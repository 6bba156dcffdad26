//! Behaviour tests: the real server on port 0 against a scripted fake upstream.

mod chat;
mod checkpoints;
mod errors;
mod fake_upstream;
mod fusion_tool;
mod helpers;
mod jobs;
mod local_llm;
mod openai_sdk;
mod pipeline_faults;
mod pipelining;
mod postgres;
mod proxy;
mod restart;
mod start_here;
mod store_faults;
mod upstream_answers;
mod wait_faults;
