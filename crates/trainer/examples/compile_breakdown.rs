//! Where the train step's trace + compile time goes (issue 13's compile target): trace (build the
//! HLO, autodiff included), serialise the `HloModuleProto`, PJRT compile; wall and process CPU
//! seconds (all threads, from `/proc/self/stat`) of each, the module's size, and the optimized
//! program's fusion / instruction counts. `XLA_FLAGS` applies as usual; `--xla NAME=VALUE`
//! (repeatable) passes a debug option as a per-compile override instead. The allocator is set up
//! as in `rattn` (`RATTN_MALLOC=default` leaves the allocator's defaults); `--steps N` also runs N steps
//! and prints the median step's CPU ms and page faults.
//!
//! ```sh
//! cargo run --release -p trainer --example compile_breakdown -- --config configs/bench.toml \
//!     [--set model.layers=16] [--xla xla_backend_optimization_level=2] [--repeat 3]
//! ```

use anyhow::{bail, Context, Result};
use hlo_builder::proto::HloModuleProto;
use pjrt::{CompileOptions, OptionOverride, Program};
use prost::Message;
use std::path::PathBuf;
use std::time::Instant;
use trainer::config::RunConfig;

/// User + system CPU seconds of this process (all threads) so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (in parentheses): utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // `rest` starts at field 3 (state), so field n is at index n - 3.
    (ticks(14 - 3) + ticks(15 - 3)) / 100.0
}

/// Minor page faults of this process (all threads) so far.
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    // minflt is the 10th field.
    rest.split_whitespace()
        .nth(10 - 3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Wall and CPU seconds of `f`.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64, f64)> {
    let (w, c) = (Instant::now(), cpu_seconds());
    let out = f()?;
    Ok((out, w.elapsed().as_secs_f64(), cpu_seconds() - c))
}

fn parse_override(s: &str) -> Result<(String, OptionOverride)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("--xla {s}: expected NAME=VALUE"))?;
    let v = match v {
        "true" => OptionOverride::Bool(true),
        "false" => OptionOverride::Bool(false),
        _ => match v.parse::<i64>() {
            Ok(i) => OptionOverride::Int(i),
            Err(_) => OptionOverride::Str(v.to_string()),
        },
    };
    Ok((k.to_string(), v))
}

/// jemalloc as the process's C allocator, as in `rattn` (`pjrt::host_memory`).
#[cfg(all(feature = "jemalloc", target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> Result<()> {
    // The allocator setup `rattn` does first (`RATTN_MALLOC=default`: the allocator's own defaults).
    pjrt::host_memory::retain_freed_memory();
    println!("malloc: {:?}", pjrt::host_memory::malloc_kind());
    let mut config = PathBuf::from("configs/bench.toml");
    let mut sets = Vec::new();
    let mut overrides = Vec::new();
    let mut repeat = 1usize;
    let mut steps = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--config" => config = PathBuf::from(val()?),
            "--set" => sets.push(val()?),
            "--xla" => overrides.push(parse_override(&val()?)?),
            "--repeat" => repeat = val()?.parse()?,
            "--steps" => steps = val()?.parse()?,
            _ => bail!("unknown argument {a}"),
        }
    }
    let cfg = RunConfig::load(&config, &sets)?;
    let client = pjrt::Client::cpu()?;
    pallas_port::register_cpu_kernels(&client)?;
    let platform = client.platform_name()?;
    let mesh = model::Mesh::single();
    let options = CompileOptions {
        debug_overrides: overrides.into_iter().collect(),
        ..CompileOptions::default()
    };
    let mut exe_last = None;
    for r in 0..repeat {
        let (comp, tw, tc) =
            timed(|| Ok(trainer::step::build_train_step(&cfg, &platform, &mesh)?))?;
        let (bytes, sw, sc) = timed(|| Ok(comp.to_bytes()))?;
        let (exe, cw, cc) = timed(|| Ok(client.compile(Program::Hlo(&bytes), &options)?))?;
        let opt = HloModuleProto::decode(exe.optimized_program()?.as_slice())?;
        let count = |p: &dyn Fn(&str) -> bool| -> usize {
            opt.computations
                .iter()
                .flat_map(|c| &c.instructions)
                .filter(|i| p(&i.opcode))
                .count()
        };
        let entry = opt.entry_computation().map_or(0, |c| c.instructions.len());
        let traced_instr: usize = HloModuleProto::decode(bytes.as_slice())?
            .computations
            .iter()
            .map(|c| c.instructions.len())
            .sum();
        println!(
            "round {r}: trace {tw:.3} s (cpu {tc:.2}), serialise {sw:.3} s ({:.2} MB, {traced_instr} instructions), \
             compile {cw:.3} s (cpu {cc:.2}); total {:.3} s (cpu {:.2}) | optimized: {} computations, \
             {} instructions, entry {entry}, fusions {}, dots {}, custom-calls {}, whiles {}, copies {}",
            bytes.len() as f64 / 1e6,
            tw + sw + cw,
            tc + sc + cc,
            opt.computations.len(),
            count(&|_| true),
            count(&|o| o == "fusion"),
            count(&|o| o == "dot"),
            count(&|o| o == "custom-call"),
            count(&|o| o == "while"),
            count(&|o| o == "copy"),
        );
        exe_last = Some(exe);
    }
    if let (Some(exe), true) = (exe_last, steps > 0) {
        run_steps(&client, &exe, &cfg, steps)?;
    }
    Ok(())
}

/// Runs `steps` train steps from the initial parameters on a fixed batch; prints each loss (with
/// its bits, to compare programs bit for bit) and the median wall / CPU ms per step.
fn run_steps(
    client: &pjrt::Client,
    exe: &pjrt::LoadedExecutable,
    cfg: &RunConfig,
    steps: usize,
) -> Result<()> {
    let m = model::Model::new(cfg.model.clone())?;
    let specs = m.param_specs();
    let io = trainer::step::StepIo::new(specs.len());
    let up = |data: &[f32], shape: &[usize]| -> Result<pjrt::Buffer> {
        let s: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
        Ok(client.buffer_from_host(data, &s, None)?)
    };
    let mut state = Vec::new();
    for s in specs {
        state.push(up(&model::init_param(s, cfg.train.seed), &s.shape)?);
    }
    for _ in 0..2 {
        for s in specs {
            state.push(up(&vec![0.0; s.numel()], &s.shape)?);
        }
    }
    let (b, t) = (cfg.train.batch, cfg.model.seq_len);
    let vocab = cfg.model.vocab;
    let tokens: Vec<i32> = (0..b * (t + 1))
        .map(|i| ((i * 7 + i / 13) % vocab) as i32)
        .collect();
    let weights = vec![1.0f32; b * t];
    let (mut walls, mut cpus, mut faults, mut losses) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..steps {
        let step = client.buffer_from_host(&[i as f32], &[], None)?;
        let tok = client.buffer_from_host(&tokens, &[b as i64, t as i64 + 1], None)?;
        let w = client.buffer_from_host(&weights, &[b as i64, t as i64], None)?;
        let args = io.arguments(std::mem::take(&mut state), step, tok, w);
        let f0 = minor_faults();
        let ((loss, st), wall, cpu) = timed(|| {
            let out = io
                .outputs(exe.execute_donating(args)?)
                .context("train step outputs")?;
            Ok((out.loss.to_host::<f32>()?[0], out.state))
        })?;
        state = st;
        losses.push(loss);
        if i > 0 {
            walls.push(wall * 1e3);
            cpus.push(cpu * 1e3);
            faults.push((minor_faults() - f0) as f64);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let ls: Vec<String> = losses
        .iter()
        .map(|l| format!("{l:.6} ({:08x})", l.to_bits()))
        .collect();
    // FNV-1a over the bits of the final state: equal hashes = bit-identical parameters and moments.
    let mut hash = 0xcbf29ce484222325u64;
    for b in &state {
        for x in b.to_host::<f32>()? {
            for byte in x.to_bits().to_le_bytes() {
                hash = (hash ^ byte as u64).wrapping_mul(0x100000001b3);
            }
        }
    }
    println!("losses: {}; final state hash {hash:016x}", ls.join(", "));
    println!(
        "step (median of {} after the first): wall {:.1} ms, cpu {:.1} ms, {:.0} page faults",
        walls.len(),
        median(&mut walls),
        median(&mut cpus),
        median(&mut faults)
    );
    Ok(())
}
