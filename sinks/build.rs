//! Rebuild when a migration is added or changed: `sqlx::migrate!` embeds the directory at compile time
//! (as sqlx's documentation advises).
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
