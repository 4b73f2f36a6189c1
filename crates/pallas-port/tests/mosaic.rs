//! The Mosaic (TPU) back end: the blocked RLA kernels run by the interpreter against the f64
//! reference and the CPU kernels; the checks for what libtpu accepts silently; the HLO layout
//! change against the host one (XLA CPU); and libtpu AOT compiles of both kernels on v5e, v5p
//! and v6e (skipped, with a message, when libtpu is not installed; each compile runs in a child
//! process because libtpu aborts the process on some malformed kernels).

mod common;

use common::{cfg, check_blocks, dims, f32_shape, run, Rng};
use hlo_builder::Builder;
use pallas_port::lang::mosaic::{self, MosaicReport};
use pallas_port::lang::rla_mosaic::{self, Layout};
use pallas_port::lang::{Affine, BlockSpec, GridAxis, Index, Kernel, KernelBuilder};
use pallas_port::{FeatureMap, Lowering, RlaConfig, RlaDims};

fn check_numerics(d: RlaDims, cfg: RlaConfig, seed: u64) {
    check_blocks(
        &format!("{d} {cfg:?}"),
        &d,
        &cfg,
        seed,
        |q, k, v| rla_mosaic::interpret_fwd(&cfg, &d, q, k, v).expect("interpret_fwd"),
        |q, k, v, cs, d_o| {
            rla_mosaic::interpret_bwd(&cfg, &d, q, k, v, cs, d_o).expect("interpret_bwd")
        },
    );
}

#[test]
fn mosaic_kernels_match_reference_in_the_interpreter() {
    // T not a multiple of the chunk; the window inside a sub-chunk, across chunks, beyond T;
    // groups of 1, 2 and 4 query heads.
    check_numerics(
        dims(2, 100, 4, 2, 16),
        cfg(5, 16, 32, FeatureMap::Softmax),
        1,
    );
    check_numerics(dims(1, 77, 4, 1, 8), cfg(40, 8, 24, FeatureMap::Softmax), 2);
    check_numerics(
        dims(1, 64, 2, 2, 32),
        cfg(0, 16, 16, FeatureMap::Softmax),
        3,
    );
    check_numerics(
        dims(1, 20, 1, 1, 16),
        cfg(30, 16, 32, FeatureMap::Softmax),
        4,
    );
    check_numerics(dims(1, 90, 4, 1, 16), cfg(7, 16, 32, FeatureMap::Relu), 5);
}

#[test]
fn hlo_layout_change_equals_the_host_one() {
    // The graph wrapper's transpose/pad/reshape (run by XLA CPU) and its inverse against the
    // host functions the interpreter test uses: shifts inside T, past T' and zero.
    for (t, shift, sub, chunk) in [
        (37, 6, 8, 16),
        (20, 31, 8, 16),
        (48, 0, 8, 24),
        (16, 40, 8, 8),
    ] {
        let d = dims(2, t, 3, 3, 8);
        let c = cfg(shift.max(1) - 1, sub, chunk, FeatureMap::Softmax);
        let l = Layout::new(&c, &d).unwrap();
        let shift = if shift == 0 { 0 } else { l.shift };
        let x = Rng::new(t as u64).vec(d.q_len(), 1.0);
        let b = Builder::new("layout");
        let xp = b.parameter(f32_shape(&d.q_shape()), "x").unwrap();
        let y = rla_mosaic::to_kernel_layout_hlo(&b, &l, xp, shift).unwrap();
        let back = rla_mosaic::from_kernel_layout_hlo(&b, &l, y, shift).unwrap();
        let root = b.tuple(&[y, back]).unwrap();
        let out = run(&b, root, &[(&x, &d.q_shape())]);
        let want_y = rla_mosaic::to_kernel_layout(&l, &x, 3, shift);
        let want_back = rla_mosaic::from_kernel_layout(&l, &want_y, 3, shift);
        assert_eq!(out[0], want_y, "t {t} shift {shift}: to_kernel_layout");
        assert_eq!(out[1], want_back, "t {t} shift {shift}: from_kernel_layout");
        // Rows that survive the round trip are the input's rows s < T − shift... none past T.
        let h = 8;
        for s in 0..t {
            let row = &out[1][s * 3 * h..(s + 1) * 3 * h];
            if s + shift < t {
                assert_eq!(row, &x[(s) * 3 * h..(s + 1) * 3 * h], "row {s}");
            }
        }
    }
}

/// A one-axis kernel `y = x + x` over blocks `block` of an f32 `array`, `grid` programs.
fn add_kernel(array: &[usize], block: &[usize], grid: usize) -> Result<Kernel, String> {
    let mut k = KernelBuilder::new("add", &[GridAxis::parallel(grid)]);
    let mut map = vec![Affine::constant(0); array.len()];
    map[0] = Affine::program(0);
    let spec = BlockSpec {
        shape: block.to_vec(),
        index_map: map,
    };
    let x = k
        .input_block("x", array, spec.clone())
        .map_err(|e| e.to_string())?;
    let y = k
        .output_block("y", array, spec)
        .map_err(|e| e.to_string())?;
    let zero = k.int(0);
    let ix = [Index::Slice(zero, block[0]), Index::Slice(zero, block[1])];
    let t = k.load(x, &ix).map_err(|e| e.to_string())?;
    let t2 = k.add(t, t).map_err(|e| e.to_string())?;
    k.store(y, &ix, t2).map_err(|e| e.to_string())?;
    k.finish().map_err(|e| e.to_string())
}

fn check_err(k: &Kernel, budget: usize) -> String {
    mosaic::check(k, budget).unwrap_err().to_string()
}

#[test]
fn checks_refuse_what_libtpu_accepts_silently() {
    // A good kernel: (8,128) blocks of a 64x256 array? No: blocks span the whole lane dim.
    let ok = add_kernel(&[64, 256], &[8, 256], 8).unwrap();
    let r: MosaicReport = mosaic::check(&ok, mosaic::DEFAULT_VMEM_BUDGET).unwrap();
    // Two buffers each for x and y: 4 · 8·256·4 bytes.
    assert_eq!(r.vmem_total(), 4 * 8 * 256 * 4);
    assert_eq!(r.flops, 64 * 256);
    // A grid of 9 blocks over an array that holds 8.
    let e = check_err(&add_kernel(&[64, 256], &[8, 256], 9).unwrap(), usize::MAX);
    assert!(
        e.contains("visits blocks 0..=8") && e.contains("holds 8 block"),
        "{e}"
    );
    // Misaligned tiles: 100 lanes of 256, 4 sublanes of 64.
    let mut bad = ok.clone();
    bad.inputs[0].block.shape = vec![8, 100];
    let e = check_err(&bad, usize::MAX);
    assert!(
        e.contains("misaligned along dim 1") && e.contains("multiple of 128"),
        "{e}"
    );
    bad.inputs[0].block.shape = vec![4, 256];
    let e = check_err(&bad, usize::MAX);
    assert!(
        e.contains("misaligned along dim 0") && e.contains("multiple of 8"),
        "{e}"
    );
    // A block larger than its array (the builder refuses it too; a hand-made kernel is checked).
    bad.inputs[0].block.shape = vec![8, 512];
    let e = check_err(&bad, usize::MAX);
    assert!(e.contains("larger than the array along dim 1"), "{e}");
    // VMEM over the budget.
    let e = check_err(&ok, 16 * 1024);
    assert!(
        e.contains("needs 32768 bytes of VMEM") && e.contains("budget of 16384"),
        "{e}"
    );
    // An access that may leave its block (rows 4..12 of an 8-row block).
    let mut k = KernelBuilder::new("oob", &[GridAxis::parallel(8)]);
    let spec = BlockSpec {
        shape: vec![8, 256],
        index_map: vec![Affine::program(0), Affine::constant(0)],
    };
    let x = k.input_block("x", &[64, 256], spec.clone()).unwrap();
    let y = k.output_block("y", &[64, 256], spec).unwrap();
    let (zero, four) = (k.int(0), k.int(4));
    let t = k
        .load(x, &[Index::Slice(four, 8), Index::Slice(zero, 256)])
        .unwrap();
    k.store(y, &[Index::Slice(zero, 8), Index::Slice(zero, 256)], t)
        .unwrap();
    let e = check_err(&k.finish().unwrap(), usize::MAX);
    assert!(
        e.contains("`x`") && e.contains("may leave the block"),
        "{e}"
    );
}

#[test]
fn rla_kernels_emit_and_report_vmem() {
    // The 3B model's RLA shapes (H 128, 4 query heads per kv head, chunk 512, sub-chunk 128).
    let d = dims(1, 1024, 16, 4, 128);
    let c = cfg(512, 128, 512, FeatureMap::Softmax);
    let [(fname, fwd), (bname, bwd)] = rla_mosaic::vmem_use(&c, &d).unwrap();
    eprintln!("VMEM: {fname} {fwd} bytes, {bname} {bwd} bytes");
    // Forward: q, o blocks 4·512·128·4 = 1 MiB; k, v 256 KiB; chunk_states, final_state 128 KiB;
    // two buffers each; scratch 128 KiB.
    let mib = 1 << 20;
    assert_eq!(fwd, 2 * (2 * mib + 2 * mib / 4 + 2 * mib / 8) + mib / 8);
    // Backward: q, d_o, dq 1 MiB; k, v, dk, dv 256 KiB; chunk_states 128 KiB; scratch 128 KiB.
    assert_eq!(bwd, 2 * (3 * mib + 4 * mib / 4 + mib / 8) + mib / 8);
    let k = rla_mosaic::fwd_kernel(&c, &d).unwrap();
    let text = mosaic::emit(&k).unwrap();
    for want in [
        "\"stable_mosaic.tpu.matmul\"",
        "#tpu.dimension_semantics<arbitrary>",
        "iteration_bounds = array<i64: 1, 4, 2>",
        "window_params = [{transform_indices = @transform_in0, window_bounds = array<i64: 1, 4, 4, 128, 128>}",
        "stable_mosaic.version = 11 : i64",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// libtpu AOT compiles.

/// Runs `body` in a child process (libtpu CHECK-aborts on some malformed kernels). Returns
/// `false` (after printing why) when libtpu is not installed.
fn in_child(test: &str, body: impl FnOnce(&pjrt::Plugin)) -> bool {
    use pjrt::install::{PluginCache, PluginKind};
    if std::env::var_os("RATTN_MOSAIC_CHILD").is_some() {
        for (k, v) in pjrt::tpu::environment() {
            if std::env::var_os(k).is_none() {
                std::env::set_var(k, v);
            }
        }
        let plugin = PluginCache::default()
            .load(PluginKind::Tpu)
            .expect("loading libtpu");
        body(&plugin);
        return true;
    }
    if !PluginCache::default()
        .ready_for_test(PluginKind::Tpu, test)
        .expect("installing libtpu")
    {
        return false;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("RATTN_MOSAIC_CHILD", "1")
        .output()
        .expect("running the test binary as a child");
    eprintln!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{test}: child failed: {}", out.status);
    true
}

fn compile_kernel(plugin: &pjrt::Plugin, topo_name: &str, k: &Kernel) {
    let b = Builder::new(&k.name);
    let args: Vec<_> = k
        .inputs
        .iter()
        .map(|a| b.parameter(f32_shape(&a.shape), &a.name).unwrap())
        .collect();
    let gen = topo_name.split(':').next().unwrap();
    let budget = mosaic::scoped_vmem_limit(gen).unwrap();
    let report = mosaic::check(k, budget).unwrap();
    let root = mosaic::custom_call(&b, k, &args, budget).unwrap();
    let comp = b.build(root).unwrap();
    let topo = pjrt::topology::Topology::tpu(plugin, topo_name).unwrap();
    let t = std::time::Instant::now();
    let exe = topo
        .compile(
            pjrt::Program::Hlo(&comp.to_bytes()),
            &pjrt::CompileOptions::default(),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{topo_name}: {} did not compile: {e}\n{}",
                k.name,
                mosaic::emit(k).unwrap()
            )
        });
    let opt = exe.optimized_program().unwrap();
    let vmem = mosaic::compiled_vmem(&opt).first().copied();
    let cost = exe.cost_analysis().unwrap();
    eprintln!(
        "{topo_name}: {} compiled in {:?}; VMEM ours {} libtpu {vmem:?}; flops ours {} XLA {:?}",
        k.name,
        t.elapsed(),
        report.vmem_total(),
        report.flops,
        cost.flops()
    );
    assert!(
        String::from_utf8_lossy(&opt).contains("tpu_custom_call"),
        "{topo_name}: no tpu_custom_call in the optimized program"
    );
    // libtpu adds Mosaic's internal scratch to our blocks + scratch.
    let vmem = vmem.expect("used_scoped_memory_configs in the optimized program");
    assert!(
        (report.vmem_total()..=budget).contains(&vmem),
        "{topo_name}: libtpu's VMEM {vmem} vs ours {} and the budget {budget}",
        report.vmem_total()
    );
    // Our cost estimate reaches XLA's cost model (which cannot look inside the kernel).
    assert!(cost.flops().unwrap() >= report.flops as f64, "{cost:?}");
}

#[test]
fn rla_kernels_compile_for_v5e_v5p_v6e() {
    let test = "rla_kernels_compile_for_v5e_v5p_v6e";
    in_child(test, |plugin| {
        let d = dims(1, 1024, 16, 4, 128);
        let c = cfg(512, 128, 512, FeatureMap::Softmax);
        let kernels = [
            rla_mosaic::fwd_kernel(&c, &d).unwrap(),
            rla_mosaic::bwd_kernel(&c, &d).unwrap(),
        ];
        for topo in ["v5e:2x2", "v5p:2x2x1", "v6e:1x1"] {
            for k in &kernels {
                compile_kernel(plugin, topo, k);
            }
        }
    });
}

#[test]
fn rla_kernels_compile_for_head_dim_64_and_relu() {
    let test = "rla_kernels_compile_for_head_dim_64_and_relu";
    in_child(test, |plugin| {
        let d = dims(2, 700, 8, 2, 64);
        let c = cfg(100, 64, 256, FeatureMap::Relu);
        let fwd = rla_mosaic::fwd_kernel(&c, &d).unwrap();
        for k in [&fwd, &rla_mosaic::bwd_kernel(&c, &d).unwrap()] {
            compile_kernel(plugin, "v5e:2x2", k);
        }
        // Without our cost estimate XLA's cost model sees no work in the kernel.
        let b = Builder::new("no_estimate");
        let args: Vec<_> = fwd
            .inputs
            .iter()
            .map(|a| b.parameter(f32_shape(&a.shape), &a.name).unwrap())
            .collect();
        let result =
            hlo_builder::Shape::tuple(fwd.outputs.iter().map(|a| f32_shape(&a.shape)).collect());
        let config = mosaic::backend_config(&mosaic::emit(&fwd).unwrap(), None);
        let root = b
            .custom_call_with_config(mosaic::TARGET, &args, result, &config, 1)
            .unwrap();
        let topo = pjrt::topology::Topology::tpu(plugin, "v5e:2x2").unwrap();
        let exe = topo
            .compile(
                pjrt::Program::Hlo(&b.build(root).unwrap().to_bytes()),
                &pjrt::CompileOptions::default(),
            )
            .unwrap();
        let flops = exe.cost_analysis().unwrap().flops().unwrap_or(0.0);
        let ours = mosaic::check(&fwd, usize::MAX).unwrap().flops as f64;
        eprintln!("v5e: rla_fwd_mosaic without cost_estimate: XLA flops {flops} (ours {ours})");
        assert!(
            flops < 1e-3 * ours,
            "XLA counted {flops} flops in an opaque kernel"
        );
    });
}

#[test]
fn rla_with_grad_compiles_for_v5p_with_mosaic_lowering() {
    let test = "rla_with_grad_compiles_for_v5p_with_mosaic_lowering";
    in_child(test, |plugin| {
        let d = dims(1, 1000, 8, 2, 128);
        let c = cfg(512, 128, 512, FeatureMap::Softmax);
        let b = Builder::new("rla_mosaic");
        let q = b.parameter(f32_shape(&d.q_shape()), "q").unwrap();
        let k = b.parameter(f32_shape(&d.kv_shape()), "k").unwrap();
        let v = b.parameter(f32_shape(&d.kv_shape()), "v").unwrap();
        let lowering = Lowering::Auto.for_platform("tpu");
        assert_eq!(lowering, Lowering::Mosaic);
        let o = pallas_port::rla(&b, q, k, v, &c, lowering).unwrap();
        let loss = b.reduce_sum(o, &[0, 1, 2, 3]).unwrap();
        let g = b.grad(loss, &[q, k, v]).unwrap();
        let root = b.tuple(&[loss, g[0], g[1], g[2]]).unwrap();
        let comp = b.build(root).unwrap();
        let topo = pjrt::topology::Topology::tpu(plugin, "v5p:2x2x1").unwrap();
        let exe = topo
            .compile(
                pjrt::Program::Hlo(&comp.to_bytes()),
                &pjrt::CompileOptions::default(),
            )
            .unwrap();
        let opt = String::from_utf8_lossy(&exe.optimized_program().unwrap()).into_owned();
        assert_eq!(
            opt.matches("tpu_custom_call").count(),
            2,
            "fwd and bwd kernels"
        );
        eprintln!("v5p: rla + grad: {:?}", exe.memory_stats().unwrap());
    });
}
