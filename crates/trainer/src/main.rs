//! `rattn`: train, evaluate, generate, dump, benchmark and manage PJRT plugins.

mod config;

fn main() {}
