//! Ahead-of-time compilation for TPU (libtpu) and GPU (CUDA plugin) topologies, with no
//! accelerator attached.
//!
//! The plugins are large (libtpu 467 MB, CUDA 396 MB + ptxas 38 MB), so these tests run only when
//! `RATTN_AOT_TESTS=1` (which installs what is missing) or when the plugin is already installed
//! in the cache; otherwise each test prints a skip line and returns.

use std::path::PathBuf;
use std::sync::Once;

use pjrt::install::{PluginCache, PluginKind};
use pjrt::topology::{Topology, TopologyKind};
use pjrt::{CompileOptions, Error, ErrorCode, Plugin, Program};

/// Sets the environment libtpu and the CUDA plugin read when they load, once per test process,
/// before the first plugin is loaded. `pjrt::tpu::set_environment` refuses to run here because
/// the test harness already runs threads; setting the variables is still sound because every
/// test reaches a plugin only through this `Once`, so no plugin code runs while they change.
fn plugin_environment() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (k, v) in pjrt::tpu::environment()
            .into_iter()
            .chain(pjrt::gpu::environment())
        {
            if std::env::var_os(k).is_none() {
                std::env::set_var(k, v);
            }
        }
    });
}

/// The plugin of `kind` for test `test` (`None`: not installed, the test skips).
fn plugin(kind: PluginKind, test: &str) -> Option<Plugin> {
    plugin_environment();
    PluginCache::default()
        .load_for_test(kind, test)
        .unwrap_or_else(|e| panic!("installing or loading the {kind:?} plugin for {test}: {e}"))
}

fn tpu(test: &str) -> Option<Plugin> {
    plugin(PluginKind::Tpu, test)
}

fn gpu(test: &str) -> Option<Plugin> {
    plugin(PluginKind::Cuda, test)
}

/// `tanh(a @ b)` over `a: f32[m,k]`, `b: f32[k,n]`.
fn dot_tanh(m: usize, k: usize, n: usize) -> String {
    format!(
        r#"module @dot_tanh {{
  func.func public @main(%a: tensor<{m}x{k}xf32>, %b: tensor<{k}x{n}xf32>) -> tensor<{m}x{n}xf32> {{
    %0 = stablehlo.dot_general %a, %b, contracting_dims = [1] x [0] : (tensor<{m}x{k}xf32>, tensor<{k}x{n}xf32>) -> tensor<{m}x{n}xf32>
    %1 = stablehlo.tanh %0 : tensor<{m}x{n}xf32>
    return %1 : tensor<{m}x{n}xf32>
  }}
}}"#
    )
}

/// A module calling a custom call that only a CPU FFI handler could serve.
const CPU_ONLY_CUSTOM_CALL: &str = r#"
module @cpu_only {
  func.func public @main(%x: tensor<8xf32>) -> tensor<8xf32> {
    %0 = stablehlo.custom_call @rattn_cpu_only_kernel(%x) {api_version = 4 : i32} : (tensor<8xf32>) -> tensor<8xf32>
    return %0 : tensor<8xf32>
  }
}"#;

/// A 4-way GSPMD module: `x * x` over `f32[n]` split across 4 partitions.
fn spmd4(n: usize) -> String {
    format!(
        r#"module @spmd attributes {{mhlo.num_partitions = 4 : i32}} {{
  func.func public @main(%x: tensor<{n}xf32> {{mhlo.sharding = "{{devices=[4]<=[4]}}"}})
      -> (tensor<{n}xf32> {{mhlo.sharding = "{{devices=[4]<=[4]}}"}}) {{
    %sq = stablehlo.multiply %x, %x : tensor<{n}xf32>
    return %sq : tensor<{n}xf32>
  }}
}}"#
    )
}

#[path = "common/hlo.rs"]
mod hlo;

fn module_name(proto: &[u8]) -> String {
    use prost::Message;
    xla_data::proto::HloModuleProto::decode(proto)
        .expect("HloModuleProto")
        .name
}

/// Checks a compiled `tanh(a @ b)` against numbers computed here from the shapes.
fn check_dot_tanh(exe: &pjrt::Executable, m: usize, k: usize, n: usize) {
    let f32_bytes = 4i64;
    let inputs = f32_bytes * (m * k + k * n) as i64;
    let output = f32_bytes * (m * n) as i64;
    let stats = exe.memory_stats().unwrap();
    assert!(
        stats.argument_size_in_bytes >= inputs,
        "arguments {} < the inputs' {inputs} bytes",
        stats.argument_size_in_bytes
    );
    // Padding to hardware tiles may add bytes, but not more than doubling here (128-aligned dims).
    assert!(stats.argument_size_in_bytes <= 2 * inputs, "{stats:?}");
    assert!(stats.output_size_in_bytes >= output, "{stats:?}");
    assert!(
        stats.peak_memory_in_bytes >= inputs + output,
        "peak {} below inputs + output {}",
        stats.peak_memory_in_bytes,
        inputs + output
    );
    let limit = exe.topology().device_memory_bytes().unwrap();
    let headroom = exe.check_fits_in_device_memory().unwrap();
    assert_eq!(headroom, limit - stats.peak_memory_in_bytes);
    assert_eq!(exe.num_outputs(), 1);
    assert_eq!(exe.num_replicas().unwrap(), 1);
    assert_eq!(exe.num_partitions().unwrap(), 1);
    assert_eq!(exe.name().unwrap(), "dot_tanh");
    assert_eq!(module_name(&exe.optimized_program().unwrap()), "dot_tanh");
    assert!(!exe.serialize().unwrap().is_empty());
}

#[test]
fn tpu_topologies_describe_their_devices() {
    let Some(plugin) = tpu("tpu_topologies_describe_their_devices") else {
        return;
    };
    // (name, chips from the grid, kind, cores per device)
    for (name, chips, kind, cores) in [
        ("v5e:2x2", 4, "TPU v5 lite", 1),
        ("v5e:2x4", 8, "TPU v5 lite", 1),
        ("v6e:1x1", 1, "TPU v6 lite", 1),
        ("v5p:2x2x1", 4, "TPU v5", 2),
    ] {
        let topo = Topology::tpu(&plugin, name).unwrap();
        assert_eq!(topo.kind(), TopologyKind::Tpu);
        assert_eq!(topo.platform_name().unwrap(), "tpu");
        assert!(!topo.platform_version().unwrap().is_empty());
        let devices = topo.devices();
        assert_eq!(devices.len(), chips, "{name}");
        let mut ids: Vec<i32> = devices.iter().map(|d| d.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, (0..chips as i32).collect::<Vec<_>>(), "{name}");
        for d in devices {
            assert_eq!(d.kind, kind, "{name}");
            assert_eq!(d.num_cores(), Some(cores), "{name}");
            // Every generation here has between 8 GiB and 128 GiB of HBM per device.
            let mem = d.memory_bytes_limit().unwrap();
            assert!((8 << 30..=128 << 30).contains(&mem), "{name}: {mem}");
        }
        assert!(!topo.serialize().unwrap().is_empty());
        assert!(topo.attributes().unwrap().iter().any(|(n, _)| n == "wrap"));
    }
}

#[test]
fn dot_tanh_compiles_for_v5e_and_v6e() {
    let Some(plugin) = tpu("dot_tanh_compiles_for_v5e_and_v6e") else {
        return;
    };
    let (m, k, n) = (128, 256, 128);
    let module = dot_tanh(m, k, n);
    for name in ["v5e:2x2", "v6e:1x1"] {
        let topo = Topology::tpu(&plugin, name).unwrap();
        let t = std::time::Instant::now();
        let exe = topo
            .compile(Program::Mlir(&module), &CompileOptions::default())
            .unwrap();
        eprintln!(
            "{name}: dot_tanh {m}x{k}x{n} compiled in {:?}; {:?}",
            t.elapsed(),
            exe.memory_stats().unwrap()
        );
        check_dot_tanh(&exe, m, k, n);
        let cost = exe.cost_analysis().unwrap();
        let flops = cost.flops().unwrap();
        let dot_flops = 2.0 * (m * k * n) as f64;
        assert!(flops > 0.0);
        assert!(
            (dot_flops..=dot_flops * 1.01).contains(&flops),
            "{name}: flops {flops} vs 2mkn = {dot_flops}"
        );
        assert_eq!(
            cost.transcendentals(),
            Some((m * n) as f64),
            "{name}: one tanh per output"
        );
        assert!(cost.optimal_seconds().unwrap() > 0.0);
        assert!(cost.bytes_accessed().unwrap() >= (4 * (m * k + k * n + m * n)) as f64);
        // The same inputs give the same executable.
        let again = topo
            .compile(Program::Mlir(&module), &CompileOptions::default())
            .unwrap();
        assert_eq!(exe.fingerprint().unwrap(), again.fingerprint().unwrap());
    }
}

#[test]
fn hlo_proto_compiles_for_tpu() {
    let Some(plugin) = tpu("hlo_proto_compiles_for_tpu") else {
        return;
    };
    let topo = Topology::tpu(&plugin, "v5e:2x2").unwrap();
    let n = 4096;
    let exe = topo
        .compile(
            Program::Hlo(&hlo::add_mul_module(n)),
            &CompileOptions::default(),
        )
        .unwrap();
    let stats = exe.memory_stats().unwrap();
    assert!(stats.argument_size_in_bytes >= 2 * 4 * n, "{stats:?}");
    assert!(stats.output_size_in_bytes >= 4 * n, "{stats:?}");
    let cost = exe.cost_analysis().unwrap();
    // One add and one multiply per element.
    assert_eq!(cost.flops(), Some(2.0 * n as f64), "{cost:?}");
    assert_eq!(module_name(&exe.optimized_program().unwrap()), "add_mul");
}

#[test]
fn spmd_shards_per_device_and_oversubscription_is_refused() {
    let Some(plugin) = tpu("spmd_shards_per_device_and_oversubscription_is_refused") else {
        return;
    };
    let n = 4096;
    let topo = Topology::tpu(&plugin, "v5e:2x2").unwrap();
    let exe = topo
        .compile(Program::Mlir(&spmd4(n)), &CompileOptions::spmd(4))
        .unwrap();
    assert_eq!(exe.num_partitions().unwrap(), 4);
    let stats = exe.memory_stats().unwrap();
    // Per-device numbers: a quarter of the f32[n] argument.
    assert_eq!(stats.argument_size_in_bytes, 4 * n as i64 / 4, "{stats:?}");
    // 8 partitions on 4 devices would CHECK-fail inside libtpu: refused before the call.
    let err = topo
        .compile(Program::Mlir(&spmd4(n)), &CompileOptions::spmd(8))
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidOptions(m) if m.contains("8 devices needed") && m.contains("has 4 devices")),
        "{err}"
    );
    // Shardy with GSPMD shardings aborts the plugin: refused too.
    let shardy = CompileOptions {
        use_shardy_partitioner: true,
        ..CompileOptions::spmd(4)
    };
    assert!(matches!(
        topo.compile(Program::Mlir(&spmd4(n)), &shardy),
        Err(Error::InvalidOptions(_))
    ));
}

#[test]
fn tpu_hbm_overflow_is_a_clean_error() {
    let Some(plugin) = tpu("tpu_hbm_overflow_is_a_clean_error") else {
        return;
    };
    // Three bf16 32768x65536 buffers (4 GiB each) plus temporaries on a 16 GiB v5e chip.
    let module = r#"
module @too_big {
  func.func public @main(%a: tensor<65536x65536xbf16>, %b: tensor<65536x65536xbf16>) -> tensor<65536x65536xbf16> {
    %0 = stablehlo.multiply %a, %b : tensor<65536x65536xbf16>
    %1 = stablehlo.add %0, %a : tensor<65536x65536xbf16>
    return %1 : tensor<65536x65536xbf16>
  }
}"#;
    let topo = Topology::tpu(&plugin, "v5e:2x2").unwrap();
    let err = topo
        .compile(Program::Mlir(module), &CompileOptions::default())
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("does not fit"), "{err}");
    // The same program fits a v5p chip (95.7 GiB): 3 x 8 GiB.
    let v5p = Topology::tpu(&plugin, "v5p:2x2x1").unwrap();
    let exe = v5p
        .compile(Program::Mlir(module), &CompileOptions::default())
        .unwrap();
    let stats = exe.memory_stats().unwrap();
    let buffer = 2 * 65536i64 * 65536;
    assert!(stats.peak_memory_in_bytes >= 3 * buffer, "{stats:?}");
    assert!(exe.check_fits_in_device_memory().is_ok());
}

#[test]
fn unknown_tpu_names_list_the_known_ones() {
    let Some(plugin) = tpu("unknown_tpu_names_list_the_known_ones") else {
        return;
    };
    for bad in ["", "bogus", "v7x:2x2", "v5litepod-4", "v6e-8"] {
        let err = Topology::tpu(&plugin, bad).unwrap_err().to_string();
        assert!(
            err.contains("v5e:2x2") && err.contains("v6e"),
            "{bad:?}: {err}"
        );
    }
    // Passes the syntax check, refused by libtpu; the error still lists the known names.
    let err = Topology::tpu(&plugin, "v5e:3x3").unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));
    assert!(err.to_string().contains("chips_per_host_bounds"), "{err}");
    assert!(err.to_string().contains("known generations"), "{err}");
}

#[test]
fn cpu_only_custom_call_is_rejected_on_tpu() {
    let Some(plugin) = tpu("cpu_only_custom_call_is_rejected_on_tpu") else {
        return;
    };
    let topo = Topology::tpu(&plugin, "v6e:1x1").unwrap();
    assert_cpu_only_custom_call_refused(&topo, "TPU");
}

/// Compiling [`CPU_ONLY_CUSTOM_CALL`] for `topo` fails, naming the call and the platform.
fn assert_cpu_only_custom_call_refused(topo: &Topology, platform: &str) {
    let err = topo
        .compile(
            Program::Mlir(CPU_ONLY_CUSTOM_CALL),
            &CompileOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"rattn_cpu_only_kernel\"")
            && err.contains(&format!("does not exist on {platform}")),
        "{err}"
    );
}

/// The H100 spec: the shared reference copy when present, else the built-in one.
fn h100_spec_file() -> PathBuf {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/gpu_specs/h100_sxm.txtpb");
    if shared.is_file() {
        return shared;
    }
    let path = std::env::temp_dir().join(format!("pjrt-aot-h100-{}.txtpb", std::process::id()));
    std::fs::write(&path, pjrt::gpu::H100_SXM).unwrap();
    path
}

#[test]
fn dot_tanh_compiles_for_h100() {
    let Some(plugin) = gpu("dot_tanh_compiles_for_h100") else {
        return;
    };
    let topo = Topology::gpu(&plugin, &h100_spec_file(), "1x1x1").unwrap();
    assert_eq!(topo.kind(), TopologyKind::Gpu);
    assert_eq!(topo.platform_name().unwrap(), "cuda");
    let d = &topo.devices()[0];
    assert_eq!(topo.devices().len(), 1);
    assert_eq!(d.kind, "NVIDIA H100 80GB HBM3");
    assert_eq!(d.num_cores(), Some(132));
    assert_eq!(d.memory_bytes_limit(), Some(84_929_347_584));
    assert_eq!(
        d.attribute("compute_capability"),
        Some(&pjrt::NamedValue::Str("9.0".into()))
    );
    let (m, k, n) = (128, 256, 128);
    let t = std::time::Instant::now();
    let exe = topo
        .compile(
            Program::Mlir(&dot_tanh(m, k, n)),
            &CompileOptions::default(),
        )
        .unwrap();
    eprintln!(
        "h100: dot_tanh {m}x{k}x{n} compiled in {:?}; {:?}",
        t.elapsed(),
        exe.memory_stats().unwrap()
    );
    check_dot_tanh(&exe, m, k, n);
    // ptxas ran: the serialized executable carries a cubin (ELF), not TileIR for the driver.
    let blob = exe.serialize().unwrap();
    assert!(
        blob.windows(4).any(|w| w == b"\x7fELF"),
        "no cubin in {} bytes",
        blob.len()
    );
    // The CUDA plugin has no cost analysis.
    assert_eq!(
        exe.cost_analysis().unwrap_err().code(),
        Some(ErrorCode::Unimplemented)
    );
    // 8 devices described, 4-way SPMD compiles with per-device shards; 8-way on 4 is refused
    // (the plugin itself would compile it against a single device).
    let four = Topology::gpu_named(&plugin, "h100", "1x1x4").unwrap();
    assert_eq!(four.devices().len(), 4);
    let exe = four
        .compile(Program::Mlir(&spmd4(4096)), &CompileOptions::spmd(4))
        .unwrap();
    assert_eq!(exe.memory_stats().unwrap().argument_size_in_bytes, 4096);
    assert!(matches!(
        four.compile(Program::Mlir(&spmd4(4096)), &CompileOptions::spmd(8)),
        Err(Error::InvalidOptions(_))
    ));
}

#[test]
fn gpu_memory_check_and_bad_gpu_inputs() {
    let Some(plugin) = gpu("gpu_memory_check_and_bad_gpu_inputs") else {
        return;
    };
    // A made-up GPU with 200 KB of memory: the CUDA compiler does not check memory, so the
    // Rust-side check must catch it.
    let tiny = pjrt::gpu::H100_SXM.replace(
        "device_memory_size: 84929347584",
        "device_memory_size: 200000",
    );
    let topo = Topology::gpu_from_spec(&plugin, &tiny, "1x1x1").unwrap();
    assert_eq!(topo.device_memory_bytes(), Some(200_000));
    let exe = topo
        .compile(
            Program::Mlir(&dot_tanh(128, 256, 128)),
            &CompileOptions::default(),
        )
        .unwrap();
    let err = exe.check_fits_in_device_memory().unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("200000 bytes"), "{err}");

    // Unknown built-in GPU names list the known ones.
    let err = Topology::gpu_named(&plugin, "h200", "1x1x1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("h100") && err.contains("a100"), "{err}");
    // Bad shapes name the expected format.
    let err = Topology::gpu_named(&plugin, "h100", "8")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("<partitions>x<hosts per partition>x<devices per host>"),
        "{err}"
    );
    // An incomplete spec (SIGFPE at compile time in the plugin) is refused up front.
    let path =
        std::env::temp_dir().join(format!("pjrt-aot-incomplete-{}.txtpb", std::process::id()));
    std::fs::write(&path, "platform_name: \"CUDA\"\n").unwrap();
    let err = Topology::gpu(&plugin, &path, "1x1x1")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gpu_device_info") && err.contains(&path.display().to_string()),
        "{err}"
    );
    let _ = std::fs::remove_file(&path);
    // A missing file names the file.
    let err = Topology::gpu(&plugin, &PathBuf::from("/nonexistent/h100.txtpb"), "1x1x1")
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/h100.txtpb"), "{err}");
    // The A100 spec compiles to sm_80.
    let a100 = Topology::gpu_named(&plugin, "a100", "1x1x1").unwrap();
    assert_eq!(
        a100.devices()[0].attribute("compute_capability"),
        Some(&pjrt::NamedValue::Str("8.0".into()))
    );
}

#[test]
fn cpu_only_custom_call_is_rejected_on_gpu() {
    let Some(plugin) = gpu("cpu_only_custom_call_is_rejected_on_gpu") else {
        return;
    };
    let topo = Topology::gpu_named(&plugin, "h100", "1x1x1").unwrap();
    assert_cpu_only_custom_call_refused(&topo, "GPU");
}
