//! `rattn`: train, evaluate, generate, dump, benchmark and manage PJRT plugins.

mod config;
mod data;

fn main() {}
