//! `--profile DIR` for `rattn train` and `rattn generate`: a trace a person opens in Perfetto
//! (<https://ui.perfetto.dev>, "Open trace file") or `chrome://tracing`, with time per HLO op or
//! fusion, and a summary of the hot ops.
//!
//! **What the plugin offers.** The PJRT C API's way to trace device activity is the profiler
//! extension (`PJRT_Extension_Type_Profiler` = 1), which yields XSpace protobufs. The XLA CPU
//! plugin we load (`lammps-jax-pjrt-cpu` 0.11.2) does not carry it: its extension chain holds
//! types 24 (XlaTransform), 19 (Shardings), 9 (PhaseCompile), 5 (FFI), 6 (MemoryDescriptions)
//! and 4 (Layouts). Its TraceMe instrumentation (`xla_cpu_enable_xprof_traceme`) records only into
//! a profiler session, which nothing outside the plugin can start, and its exported symbols are
//! `GetPjrtApi` alone. So on CPU there is no per-op timing from inside a real execution.
//!
//! **What we do instead, and say so in the trace.**
//! 1. *Measured*: every dispatch (train step, prefill, decode step or loop) and every compile is
//!    a span on the "host (measured)" track, from the wall clock around the PJRT call.
//! 2. *Replayed*: after the run, each top-level instruction of each profiled executable's
//!    *optimized* program (what XLA runs: fusions, dots, custom calls, whiles, copies) is compiled
//!    alone as a module whose parameters are its operands (same shapes and layouts, zero-filled),
//!    and timed (the fastest of 5–25 runs: on a loaded machine other jobs only add time). The ops are laid end to end in program order on one
//!    track per executable, so the track's length is the replayed sum, shown beside the measured
//!    median dispatch. Replay omits what an op gains or loses from its neighbours (cache
//!    warmth, XLA's concurrent thunk scheduling) and adds a dispatch overhead per op (~10–30 µs,
//!    the time of an empty module is printed); a `while` is timed whole (its body is not split).
//!
//! Files in DIR: `trace.json` (Chrome trace event format), `summary.txt` (also printed): the
//! hot ops by replayed time, and `replay/<program>/op_NNNN.pb`: each op's replay module.
//!
//! The session is process-global (like a tracing subscriber), so the train and generate loops
//! only call [`span`] and [`executable`]; nothing is recorded unless [`start`] was called.

use anyhow::{Context, Result};
use hlo_builder::proto::{HloComputationProto, HloInstructionProto, HloModuleProto, ShapeProto};
use pjrt::{Buffer, Client, CompileOptions, ElementType, LoadedExecutable, Program};
use prost::Message;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A span on the measured host track.
#[derive(Debug, Clone)]
struct Span {
    name: String,
    start_us: f64,
    dur_us: f64,
}

struct Session {
    dir: PathBuf,
    t0: Instant,
    spans: Vec<Span>,
    executables: Vec<(String, LoadedExecutable)>,
}

static SESSION: Mutex<Option<Session>> = Mutex::new(None);

fn session() -> std::sync::MutexGuard<'static, Option<Session>> {
    SESSION.lock().unwrap_or_else(|e| e.into_inner())
}

/// Start recording into `dir` (created now, so a bad path fails before the run).
pub fn start(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--profile: cannot create {}", dir.display()))?;
    *session() = Some(Session {
        dir: dir.to_path_buf(),
        t0: Instant::now(),
        spans: Vec::new(),
        executables: Vec::new(),
    });
    Ok(())
}

/// Whether a profile is being recorded.
pub fn active() -> bool {
    session().is_some()
}

/// Run `f` and record it as a span `name` on the measured host track (when profiling).
pub fn span<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    if let Some(s) = session().as_mut() {
        s.spans.push(Span {
            name: name.to_string(),
            start_us: (start - s.t0).as_secs_f64() * 1e6,
            dur_us: start.elapsed().as_secs_f64() * 1e6,
        });
    }
    out
}

/// Profile executable `exe` under `name`: its optimized program's ops are replayed at
/// [`finish`]. Dispatches recorded with [`span`] under the same name are its measured time.
pub fn executable(name: &str, exe: &LoadedExecutable) {
    if let Some(s) = session().as_mut() {
        if !s.executables.iter().any(|(n, _)| n == name) {
            s.executables.push((name.to_string(), exe.clone()));
        }
    }
}

/// One top-level instruction of an optimized program, timed alone.
#[derive(Debug, Clone)]
pub struct OpTime {
    /// The instruction's name in the optimized program (`fusion.12`, `dot.3`, ...).
    pub name: String,
    /// HLO opcode (`fusion`, `dot`, `custom-call`, `while`, `copy`, ...).
    pub opcode: String,
    /// What it computes: the fusion kind and root opcode, the custom-call target, ...
    pub detail: String,
    /// Result shape.
    pub shape: String,
    /// The model scope it came from (`op_name` metadata, e.g. `layer_0/attn/...`), if any.
    pub scope: String,
    /// Replayed time (fastest run), µs; `None` when the op could not be replayed alone.
    pub micros: Option<f64>,
    /// Why it was not replayed.
    pub error: Option<String>,
}

fn shape_str(s: &Option<ShapeProto>) -> String {
    s.as_ref()
        .map(|s| hlo_builder::shape_to_string(s, false))
        .unwrap_or_default()
}

/// Zero-filled buffers for the leaves of `shape` (row-major; tuples flattened in order).
fn zero_leaves(client: &Client, shape: &ShapeProto, out: &mut Vec<Buffer>) -> Result<()> {
    if !shape.tuple_shapes.is_empty() || shape.element_type == 13 {
        for s in &shape.tuple_shapes {
            zero_leaves(client, s, out)?;
        }
        return Ok(());
    }
    let ty = ElementType::from_primitive_type(shape.element_type).with_context(|| {
        format!(
            "an operand of PrimitiveType {} has no host buffer",
            shape.element_type
        )
    })?;
    let n: i64 = shape.dimensions.iter().product();
    let bytes = vec![0u8; n as usize * ty.byte_size()];
    out.push(client.buffer_from_bytes(&bytes, ty, &shape.dimensions, None)?);
    Ok(())
}

/// Builds, in `entry`, an operand of `shape` from fresh parameters (a tuple operand from its
/// leaves); returns its instruction id.
fn operand_from_params(
    entry: &mut HloComputationProto,
    params: &mut Vec<ShapeProto>,
    next_id: &mut i64,
    shape: &ShapeProto,
) -> i64 {
    let id = *next_id;
    *next_id += 1;
    if shape.element_type == 13 {
        let elems: Vec<i64> = shape
            .tuple_shapes
            .iter()
            .map(|s| operand_from_params(entry, params, next_id, s))
            .collect();
        entry.instructions.push(HloInstructionProto {
            name: format!("replay_tuple.{id}"),
            opcode: "tuple".into(),
            shape: Some(shape.clone()),
            id,
            operand_ids: elems,
            ..Default::default()
        });
    } else {
        entry.instructions.push(HloInstructionProto {
            name: format!("replay_arg.{id}"),
            opcode: "parameter".into(),
            shape: Some(shape.clone()),
            parameter_number: params.len() as i64,
            id,
            ..Default::default()
        });
        params.push(shape.clone());
    }
    id
}

/// Every computation `root` calls, transitively, callees first.
fn callees(module: &HloModuleProto, ids: &[i64], out: &mut Vec<i64>) {
    for &id in ids {
        if out.contains(&id) {
            continue;
        }
        if let Some(c) = module.computations.iter().find(|c| c.id == id) {
            for i in &c.instructions {
                callees(module, &i.called_computation_ids, out);
            }
            out.push(id);
        }
    }
}

/// The module that runs instruction `inst` of `module`'s entry alone: its operands become
/// parameters of the same shapes. Returns the module and its parameter shapes.
fn isolate(
    module: &HloModuleProto,
    inst: &HloInstructionProto,
) -> (HloModuleProto, Vec<ShapeProto>) {
    // A fusion is replayed as its fused computation made the entry: XLA fuses it again (the CPU
    // back end does not take pre-fused HLO as input: it CHECK-fails in its fusion emitter).
    let fused = (inst.opcode == "fusion")
        .then(|| inst.called_computation_ids.first())
        .flatten()
        .and_then(|id| module.computations.iter().find(|c| c.id == *id));
    if let Some(f) = fused {
        let mut entry = f.clone();
        entry.is_fusion_computation = false;
        let mut params: Vec<(i64, ShapeProto)> = entry
            .instructions
            .iter()
            .filter(|i| i.opcode == "parameter")
            .map(|i| (i.parameter_number, i.shape.clone().unwrap_or_default()))
            .collect();
        params.sort_by_key(|p| p.0);
        let params: Vec<ShapeProto> = params.into_iter().map(|p| p.1).collect();
        return (replay_module(module, inst, entry, &params), params);
    }
    let entry = module.entry_computation();
    // XLA numbers an instruction (computation id << 32) | local index; the replay entry is a new
    // computation, numbered after the module's.
    let comp_id = module.computations.iter().map(|c| c.id).max().unwrap_or(0) + 1;
    let mut next_id = comp_id << 32;
    let mut comp = HloComputationProto {
        name: format!("replay.{comp_id}"),
        id: comp_id,
        ..Default::default()
    };
    let mut params = Vec::new();
    let mut operand_ids = Vec::new();
    for &op in &inst.operand_ids {
        let shape = entry
            .and_then(|e| e.instructions.iter().find(|i| i.id == op))
            .and_then(|i| i.shape.clone())
            .unwrap_or_default();
        operand_ids.push(operand_from_params(
            &mut comp,
            &mut params,
            &mut next_id,
            &shape,
        ));
    }
    let mut root = inst.clone();
    root.id = next_id;
    root.operand_ids = operand_ids;
    root.control_predecessor_ids.clear();
    comp.root_id = root.id;
    comp.instructions.push(root);
    (replay_module(module, inst, comp, &params), params)
}

/// The module `replay_{inst}` whose entry is `entry` (parameters `params`, the result of
/// `inst`'s shape), with every computation of `module` the entry calls.
fn replay_module(
    module: &HloModuleProto,
    inst: &HloInstructionProto,
    mut entry: HloComputationProto,
    params: &[ShapeProto],
) -> HloModuleProto {
    let program_shape = hlo_builder::proto::ProgramShapeProto {
        parameters: params.to_vec(),
        result: inst.shape.clone(),
        parameter_names: (0..params.len()).map(|i| format!("p{i}")).collect(),
    };
    entry.program_shape = Some(program_shape.clone());
    let mut called = Vec::new();
    for i in &entry.instructions {
        callees(module, &i.called_computation_ids, &mut called);
    }
    let mut computations: Vec<HloComputationProto> = called
        .iter()
        .filter_map(|id| module.computations.iter().find(|c| c.id == *id).cloned())
        .collect();
    let (name, id) = (entry.name.clone(), entry.id);
    computations.push(entry);
    HloModuleProto {
        name: format!("replay_{}", inst.name.replace(['.', '-'], "_")),
        entry_computation_name: name,
        entry_computation_id: id,
        computations,
        host_program_shape: Some(program_shape),
        id,
        ..Default::default()
    }
}

/// Sets the default (row-major) layout on `s` and its tuple elements.
fn strip_layout(s: &mut ShapeProto) {
    if s.element_type != 13 {
        let rank = s.dimensions.len() as i64;
        s.layout = Some(hlo_builder::proto::LayoutProto {
            minor_to_major: (0..rank).rev().collect(),
            ..Default::default()
        });
    }
    s.tuple_shapes.iter_mut().for_each(strip_layout);
}

/// Gives every shape of `m` the default layout and turns bitcasts into reshapes
/// (a bitcast's meaning depends on the layouts dropped).
fn default_layouts(m: &mut HloModuleProto) {
    for c in &mut m.computations {
        if let Some(ps) = c.program_shape.as_mut() {
            ps.parameters.iter_mut().for_each(strip_layout);
            ps.result.iter_mut().for_each(strip_layout);
        }
        for i in &mut c.instructions {
            i.shape.iter_mut().for_each(strip_layout);
            i.operand_shapes_with_layout
                .iter_mut()
                .for_each(strip_layout);
            if i.opcode == "bitcast" {
                i.opcode = "reshape".into();
            }
        }
    }
    if let Some(ps) = m.host_program_shape.as_mut() {
        ps.parameters.iter_mut().for_each(strip_layout);
        ps.result.iter_mut().for_each(strip_layout);
    }
}

/// Fastest of at least 5 and at most 25 runs of `run` (about 50 ms), after one warm-up run, in
/// seconds. The minimum, not the median: on a loaded machine the other jobs only add time.
fn time_min(mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    run()?;
    let mut best = f64::INFINITY;
    let (start, mut n) = (Instant::now(), 0);
    while n < 5 || (n < 25 && start.elapsed() < Duration::from_millis(50)) {
        let t = Instant::now();
        run()?;
        best = best.min(t.elapsed().as_secs_f64());
        n += 1;
    }
    Ok(best)
}

/// What `inst` computes, briefly: a fusion's kind and the opcode of its root, a custom call's
/// target, a dot's dimension numbers.
fn detail(module: &HloModuleProto, inst: &HloInstructionProto) -> String {
    match inst.opcode.as_str() {
        "fusion" => {
            let root = inst
                .called_computation_ids
                .first()
                .and_then(|id| module.computations.iter().find(|c| c.id == *id))
                .and_then(|c| c.instructions.iter().find(|i| i.id == c.root_id));
            let ops: Vec<String> = inst
                .called_computation_ids
                .first()
                .and_then(|id| module.computations.iter().find(|c| c.id == *id))
                .map(|c| {
                    let mut v: Vec<String> = c
                        .instructions
                        .iter()
                        .filter(|i| !i.is_free_at_run_time())
                        .map(|i| i.opcode.clone())
                        .collect();
                    v.dedup();
                    v
                })
                .unwrap_or_default();
            format!(
                "{} fusion, root {}: {}",
                inst.fusion_kind.trim_start_matches('k'),
                root.map_or("?", |r| r.opcode.as_str()),
                ops.join(" ")
            )
        }
        "custom-call" => inst.custom_call_target.clone(),
        _ => String::new(),
    }
}

/// Compiles and times one replay module (`op_NNNN.pb`, see [`replay_ops`]) on `client`: as laid
/// out, else with default layouts. Returns (seconds, whether layouts were defaulted).
fn time_module(client: &Client, bytes: &[u8]) -> Result<(f64, bool)> {
    let mut m = HloModuleProto::decode(bytes).context("decoding a replay module")?;
    let compile = |m: &HloModuleProto| {
        client.compile(Program::Hlo(&m.encode_to_vec()), &CompileOptions::default())
    };
    let (replay, defaulted) = match compile(&m) {
        Ok(r) => (r, false),
        Err(first) => {
            // Optimized HLO carries physical layouts and layout-changing bitcasts that XLA's
            // layout assignment refuses as input: retry with default layouts.
            default_layouts(&mut m);
            let r = compile(&m).with_context(|| format!("as laid out: {first}"))?;
            (r, true)
        }
    };
    let mut args = Vec::new();
    for p in m
        .host_program_shape
        .as_ref()
        .map(|ps| ps.parameters.as_slice())
        .unwrap_or_default()
    {
        zero_leaves(client, p, &mut args)?;
    }
    let refs: Vec<&Buffer> = args.iter().collect();
    let s = time_min(|| {
        replay.execute(&refs)?;
        Ok(())
    })?;
    Ok((s, defaulted))
}

/// The child side of [`replay_ops`] (`rattn profile-replay`): times `op_NNNN.pb` in `dir` from
/// number `start` on, printing `N <µs> <0|1 defaulted layouts>` or `N error <message>` per op
/// as it goes, so that the parent knows where a compiler crash happened.
pub fn replay_child(dir: &Path, plugin: Option<&str>, start: usize) -> Result<()> {
    use std::io::Write;
    let client = crate::runtime::open_client(plugin)?;
    let mut out = std::io::stdout().lock();
    if start == 0 {
        let us = dispatch_overhead_us(&client)?;
        writeln!(out, "overhead {us}")?;
    }
    for i in start.. {
        let path = dir.join(format!("op_{i:04}.pb"));
        let Ok(bytes) = std::fs::read(&path) else {
            break;
        };
        match time_module(&client, &bytes) {
            Ok((s, d)) => writeln!(out, "{i} {} {}", s * 1e6, d as u8)?,
            Err(e) => writeln!(out, "{i} error {}", format!("{e:#}").replace('\n', " "))?,
        }
        out.flush()?;
    }
    Ok(())
}

/// Replays every top-level instruction of `exe`'s optimized program alone (see the module docs)
/// and returns them in program order with their times, and the dispatch overhead in µs.
///
/// The replays run in a child process (`rattn profile-replay`, restarted after the op that
/// crashed it): XLA CHECK-fails, killing the process, on some optimized HLO fed back as input.
///
/// The modules stay in `dir` as `op_NNNN.pb` (serialized `HloModuleProto`, numbered like the
/// ops returned), for a closer look at one op.
pub fn replay_ops(exe: &LoadedExecutable, dir: &Path) -> Result<(Vec<OpTime>, f64)> {
    let bytes = exe.optimized_program()?;
    let module = HloModuleProto::decode(bytes.as_slice())
        .context("decoding the optimized program as an HloModuleProto")?;
    let entry = module
        .entry_computation()
        .context("the optimized program has no entry computation")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::new();
    for inst in entry
        .instructions
        .iter()
        .filter(|i| !i.is_free_at_run_time())
    {
        let (m, _) = isolate(&module, inst);
        std::fs::write(
            dir.join(format!("op_{:04}.pb", out.len())),
            m.encode_to_vec(),
        )?;
        out.push(OpTime {
            name: inst.name.clone(),
            opcode: inst.opcode.clone(),
            detail: detail(&module, inst),
            shape: shape_str(&inst.shape),
            scope: inst
                .metadata
                .as_ref()
                .map(|m| m.op_name.clone())
                .unwrap_or_default(),
            micros: None,
            error: None,
        });
    }
    let plugin = exe.client().plugin().path().to_string_lossy().into_owned();
    let me = std::env::current_exe()?;
    let (mut start, mut overhead) = (0usize, f64::NAN);
    while start < out.len() {
        let child = std::process::Command::new(&me)
            .args(["profile-replay", "--plugin", &plugin, "--start"])
            .arg(start.to_string())
            .arg(dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} profile-replay", me.display()))?;
        let res = child.wait_with_output()?;
        let mut last = None;
        for line in String::from_utf8_lossy(&res.stdout).lines() {
            let mut f = line.splitn(3, ' ');
            let (a, b, c) = (f.next(), f.next(), f.next());
            if a == Some("overhead") {
                overhead = b.and_then(|x| x.parse().ok()).unwrap_or(f64::NAN);
                continue;
            }
            let Some(i) = a
                .and_then(|x| x.parse::<usize>().ok())
                .filter(|&i| i < out.len())
            else {
                continue;
            };
            last = Some(i);
            match (b, c) {
                (Some("error"), msg) => out[i].error = Some(msg.unwrap_or("").to_string()),
                (Some(us), d) => {
                    out[i].micros = us.parse().ok();
                    if d == Some("1") {
                        out[i].detail = format!("{} (default layouts)", out[i].detail);
                    }
                }
                _ => {}
            }
        }
        let next = last.map_or(start, |i| i + 1);
        if res.status.success() {
            break;
        }
        if next >= out.len() {
            break;
        }
        // The child died on op `next` (a CHECK failure in XLA): note it and go on after it.
        let stderr = String::from_utf8_lossy(&res.stderr);
        let why = stderr
            .lines()
            .find(|l| l.contains("Check failed") || l.contains("error"))
            .unwrap_or("the replay process died")
            .trim()
            .to_string();
        out[next].error = Some(format!("crashed XLA's compiler: {why}"));
        start = next + 1;
    }
    Ok((out, overhead))
}

/// µs of executing an almost empty module (one parameter returned as is): the dispatch overhead
/// each replayed op includes.
fn dispatch_overhead_us(client: &Client) -> Result<f64> {
    let b = hlo_builder::Builder::new("empty");
    let x = b.parameter(hlo_builder::Shape::array(ElementType::F32, &[1]), "x")?;
    let y = b.add(x, x)?;
    let exe = crate::runtime::compile(client, &b.build(y)?)?;
    let arg = client.buffer_from_host(&[0f32], &[1], None)?;
    Ok(time_min(|| {
        exe.execute(&[&arg])?;
        Ok(())
    })? * 1e6)
}

/// The Chrome trace (`traceEvents`) of measured `spans` and replayed `ops` per executable.
pub fn chrome_trace(spans: &[(String, f64, f64)], ops: &[(String, Vec<OpTime>)]) -> Value {
    let mut ev = vec![
        json!({"ph": "M", "name": "process_name", "pid": 1,
               "args": {"name": "host (measured wall time of each PJRT call)"}}),
        json!({"ph": "M", "name": "thread_name", "pid": 1, "tid": 1,
               "args": {"name": "dispatches and compiles"}}),
    ];
    for (name, start, dur) in spans {
        ev.push(
            json!({"ph": "X", "name": name, "cat": "measured", "pid": 1, "tid": 1,
                       "ts": start, "dur": dur}),
        );
    }
    for (pi, (exe, list)) in ops.iter().enumerate() {
        let pid = 2 + pi;
        ev.push(json!({"ph": "M", "name": "process_name", "pid": pid,
            "args": {"name": format!("{exe}: HLO ops of the optimized program, each replayed alone (fastest run), in program order")}}));
        ev.push(
            json!({"ph": "M", "name": "thread_name", "pid": pid, "tid": 1,
                       "args": {"name": "ops"}}),
        );
        let mut t = 0.0;
        for op in list {
            let Some(us) = op.micros else { continue };
            ev.push(
                json!({"ph": "X", "name": op.name, "cat": op.opcode, "pid": pid, "tid": 1,
                "ts": t, "dur": us,
                "args": {"opcode": op.opcode, "detail": op.detail, "shape": op.shape,
                         "scope": op.scope}}),
            );
            t += us;
        }
    }
    json!({"traceEvents": ev, "displayTimeUnit": "ms",
           "otherData": {"producer": "rattn --profile", "note": "pid 1: measured; other pids: per-op replay (see rattn docs)"}})
}

/// The summary: per executable, the replayed total against the measured median dispatch, and
/// the `top` ops by replayed time with their share.
pub fn summary(
    ops: &[(String, Vec<OpTime>)],
    measured: &[(String, f64)],
    overhead_us: f64,
    top: usize,
) -> String {
    let mut s = format!(
        "Per-op times: each top-level op of the optimized program replayed alone (fastest of 5–25 runs; includes ~{overhead_us:.0} µs dispatch per op).\n"
    );
    for (exe, list) in ops {
        let total: f64 = list.iter().filter_map(|o| o.micros).sum();
        let failed = list.iter().filter(|o| o.micros.is_none()).count();
        let m = measured
            .iter()
            .find(|(n, _)| n == exe)
            .map_or("no dispatch measured".to_string(), |(_, us)| {
                format!("measured median dispatch {:.2} ms", us / 1e3)
            });
        s += &format!(
            "\n{exe}: {} ops, replayed sum {:.2} ms ({m}){}\n",
            list.len(),
            total / 1e3,
            if failed > 0 {
                format!(", {failed} not replayable alone")
            } else {
                String::new()
            }
        );
        let mut sorted: Vec<&OpTime> = list.iter().filter(|o| o.micros.is_some()).collect();
        sorted.sort_by(|a, b| b.micros.unwrap_or(0.0).total_cmp(&a.micros.unwrap_or(0.0)));
        s += &format!(
            "  {:>10} {:>6}  {:<22} {:<28} {}\n",
            "µs", "%", "op", "shape", "what / scope"
        );
        for o in sorted.iter().take(top) {
            let us = o.micros.unwrap_or(0.0);
            let what = [o.detail.as_str(), o.scope.as_str()]
                .iter()
                .filter(|x| !x.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join(" | ");
            s += &format!(
                "  {us:>10.1} {:>5.1}%  {:<22} {:<28} {}\n",
                100.0 * us / total.max(1e-9),
                o.name,
                o.shape,
                what.chars().take(110).collect::<String>()
            );
        }
        for o in list.iter().filter(|o| o.error.is_some()).take(3) {
            s += &format!(
                "  not replayed: {} ({}): {}\n",
                o.name,
                o.opcode,
                o.error
                    .as_deref()
                    .unwrap_or("")
                    .chars()
                    .take(160)
                    .collect::<String>()
            );
        }
    }
    s
}

/// Ends the session (if one was started): replays the profiled executables' ops on their client,
/// writes `trace.json` and `summary.txt` into the directory and prints the summary to stderr.
pub fn finish() -> Result<()> {
    let Some(sess) = session().take() else {
        return Ok(());
    };
    let Some((_, first)) = sess.executables.first() else {
        eprintln!("profile: no executable was profiled");
        return Ok(());
    };
    let client = first.client();
    let ext = client.plugin().extensions();
    let note = if ext.contains(&1) {
        "this plugin has the PJRT profiler extension (type 1); device traces through it are not \
         implemented yet, so ops are replayed as on CPU"
            .to_string()
    } else {
        format!(
            "this plugin has no PJRT profiler extension (its extensions: {ext:?}), so ops are \
             replayed one by one"
        )
    };
    eprintln!("profile: {note} ...");
    let mut ops = Vec::new();
    let mut overhead = f64::NAN;
    for (name, exe) in &sess.executables {
        let t = Instant::now();
        let (list, o) = replay_ops(exe, &sess.dir.join("replay").join(name))
            .with_context(|| format!("profiling {name}"))?;
        overhead = o;
        eprintln!(
            "profile: {name}: {} ops replayed in {:.1} s",
            list.len(),
            t.elapsed().as_secs_f64()
        );
        ops.push((name.clone(), list));
    }
    let mut measured = Vec::new();
    for (name, _) in &sess.executables {
        let mut d: Vec<f64> = sess
            .spans
            .iter()
            .filter(|s| &s.name == name)
            .map(|s| s.dur_us)
            .collect();
        d.sort_by(f64::total_cmp);
        if !d.is_empty() {
            measured.push((name.clone(), d[d.len() / 2]));
        }
    }
    let spans: Vec<(String, f64, f64)> = sess
        .spans
        .iter()
        .map(|s| (s.name.clone(), s.start_us, s.dur_us))
        .collect();
    let trace = chrome_trace(&spans, &ops);
    let path = sess.dir.join("trace.json");
    std::fs::write(&path, serde_json::to_vec(&trace)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let text = format!("{note}\n{}", summary(&ops, &measured, overhead, 15));
    std::fs::write(sess.dir.join("summary.txt"), &text)?;
    eprintln!(
        "{text}\nprofile: wrote {} (open in https://ui.perfetto.dev) and summary.txt",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lays_ops_end_to_end_and_skips_unreplayed() {
        let op = |name: &str, us: Option<f64>| OpTime {
            name: name.into(),
            opcode: "fusion".into(),
            detail: String::new(),
            shape: "f32[2]".into(),
            scope: String::new(),
            micros: us,
            error: us.is_none().then(|| "x".into()),
        };
        let ops = vec![(
            "step".to_string(),
            vec![op("a", Some(2.0)), op("b", None), op("c", Some(3.0))],
        )];
        let t = chrome_trace(&[("step".into(), 10.0, 7.0)], &ops);
        let ev = t["traceEvents"].as_array().unwrap();
        let x: Vec<(&str, f64, f64)> = ev
            .iter()
            .filter(|e| e["ph"] == "X")
            .map(|e| {
                (
                    e["name"].as_str().unwrap(),
                    e["ts"].as_f64().unwrap(),
                    e["dur"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(x, [("step", 10.0, 7.0), ("a", 0.0, 2.0), ("c", 2.0, 3.0)]);
        let s = summary(&ops, &[("step".into(), 7.0)], 1.0, 5);
        assert!(s.contains("replayed sum 0.01 ms"), "{s}");
        assert!(s.contains("60.0%"), "{s}");
        assert!(s.contains("not replayed: b"), "{s}");
    }
}
