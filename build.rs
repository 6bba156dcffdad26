//! Rebuilds the crate when a migration is added: `sqlx::migrate!` embeds `migrations/` at
//! compile time, but a proc macro cannot ask the compiler to watch a folder for new files.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
