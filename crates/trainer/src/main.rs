//! `rattn`: train, evaluate, generate, dump, benchmark and manage PJRT plugins.

mod config;
mod checkpoint;
mod data;

fn main() {}
