//! End-to-end tests on the CPU plugin (installed on first use by `pjrt::cpu_plugin()`).
//!
//! All tests share one process, so the plugin is loaded once and FFI registrations are global.

use pjrt::ffi::{CallFrame, FfiError};
use pjrt::{Client, CompileOptions, ElementType, Error, ErrorCode, NamedValue, Program};

fn client() -> Client {
    Client::cpu().expect("CPU client")
}

#[path = "common/hlo.rs"]
mod hlo;

#[test]
fn client_and_devices() {
    let c = client();
    assert_eq!(c.platform_name().unwrap(), "cpu");
    assert_eq!(c.plugin().api_version(), (0, 115));
    assert_eq!(c.process_index().unwrap(), 0);
    let devices = c.devices().unwrap();
    assert_eq!(devices.len(), 4);
    for (i, d) in devices.iter().enumerate() {
        assert_eq!(d.id(), i as i32);
        assert_eq!(d.kind(), "cpu");
        assert!(d.is_addressable());
        assert_eq!(d.process_index(), 0);
        assert_eq!(d.debug_string(), format!("cpu:{i}"));
    }
    assert_eq!(c.addressable_devices().unwrap().len(), 4);
    let eight = Client::new(c.plugin(), &[("cpu_device_count", NamedValue::I64(8))]).unwrap();
    assert_eq!(eight.devices().unwrap().len(), 8);

    let attrs = c.plugin().attributes().unwrap();
    let get = |n: &str| attrs.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(get("xla_version"), Some(NamedValue::I64(2)));
    match get("stablehlo_current_version") {
        Some(NamedValue::I64List(v)) => assert_eq!(v.len(), 3),
        other => panic!("stablehlo_current_version = {other:?}"),
    }
    assert!(
        c.plugin().extensions().contains(&5),
        "FFI extension missing: {:?}",
        c.plugin().extensions()
    );
}

#[test]
fn hlo_proto_add_multiply() {
    let c = client();
    let exe = c
        .compile(
            Program::Hlo(&hlo::add_mul_module(4)),
            &CompileOptions::default(),
        )
        .unwrap();
    assert_eq!(exe.num_outputs().unwrap(), 1);
    assert_eq!(
        exe.output_shapes().unwrap(),
        vec![(ElementType::F32, vec![4])]
    );
    assert_eq!(exe.name().unwrap(), "add_mul");
    let a = [1.5f32, -2.0, 3.25, 0.0];
    let b = [2.0f32, 4.0, -1.0, 7.5];
    let ba = c.buffer_from_host(&a, &[4], None).unwrap();
    let bb = c.buffer_from_host(&b, &[4], None).unwrap();
    let out = exe.execute(&[&ba, &bb]).unwrap();
    let got = out[0].to_host::<f32>().unwrap();
    for i in 0..4 {
        let want = (f64::from(a[i]) + f64::from(b[i])) * f64::from(b[i]);
        assert!(
            (f64::from(got[i]) - want).abs() < 1e-6,
            "{i}: {} vs {want}",
            got[i]
        );
    }
    let stats = exe.memory_stats().unwrap();
    assert_eq!(stats.argument_size_in_bytes, 32);
    assert_eq!(stats.output_size_in_bytes, 16);
    let optimized = exe.optimized_program().unwrap();
    use prost::Message;
    let m = xla_data::proto::HloModuleProto::decode(optimized.as_slice())
        .expect("optimized program is an HloModuleProto");
    assert!(!m.computations.is_empty());
    assert!(
        m.name.starts_with("add_mul"),
        "optimized module name {:?}",
        m.name
    );
    assert!(!exe.fingerprint().unwrap().is_empty());
    // Wrong argument count is a clean error.
    assert!(exe.execute(&[&ba]).is_err());
}

#[test]
fn stablehlo_dot_tanh() {
    let c = client();
    let module = r#"
module @dot_tanh {
  func.func public @main(%a: tensor<2x3xf32>, %b: tensor<3x2xf32>) -> tensor<2x2xf32> {
    %0 = stablehlo.dot_general %a, %b, contracting_dims = [1] x [0] : (tensor<2x3xf32>, tensor<3x2xf32>) -> tensor<2x2xf32>
    %1 = stablehlo.tanh %0 : tensor<2x2xf32>
    return %1 : tensor<2x2xf32>
  }
}"#;
    let exe = c
        .compile(Program::Mlir(module), &CompileOptions::default())
        .unwrap();
    let a = [0.1f32, -0.2, 0.3, 0.4, 0.5, -0.6];
    let b = [0.7f32, 0.8, -0.9, 1.0, 0.11, 0.12];
    let ba = c.buffer_from_host(&a, &[2, 3], None).unwrap();
    let bb = c.buffer_from_host(&b, &[3, 2], None).unwrap();
    let out = exe.execute(&[&ba, &bb]).unwrap();
    assert_eq!(out[0].dims().unwrap(), vec![2, 2]);
    let got = out[0].to_host::<f32>().unwrap();
    for i in 0..2 {
        for j in 0..2 {
            let s: f64 = (0..3)
                .map(|k| f64::from(a[i * 3 + k]) * f64::from(b[k * 2 + j]))
                .sum();
            assert!((f64::from(got[i * 2 + j]) - s.tanh()).abs() < 1e-6);
        }
    }
}

#[test]
fn spmd_gspmd_four_devices() {
    let c = client();
    let module = r#"
module @spmd attributes {mhlo.num_partitions = 4 : i32} {
  func.func public @main(%x: tensor<16xf32> {mhlo.sharding = "{devices=[4]<=[4]}"})
      -> (tensor<16xf32> {mhlo.sharding = "{devices=[4]<=[4]}"}, tensor<f32> {mhlo.sharding = "{replicated}"}) {
    %sq = stablehlo.multiply %x, %x : tensor<16xf32>
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %sum = stablehlo.reduce(%x init: %zero) applies stablehlo.add across dimensions = [0] : (tensor<16xf32>, tensor<f32>) -> tensor<f32>
    return %sq, %sum : tensor<16xf32>, tensor<f32>
  }
}"#;
    let exe = c
        .compile(Program::Mlir(module), &CompileOptions::spmd(4))
        .unwrap();
    assert_eq!(exe.addressable_devices().len(), 4);
    assert_eq!(exe.num_partitions().unwrap(), 4);
    let x: Vec<f32> = (0..16).map(|i| i as f32 * 0.5 - 3.0).collect();
    let devices = c.addressable_devices().unwrap();
    let shards: Vec<_> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            c.buffer_from_host(&x[4 * i..4 * i + 4], &[4], Some(d))
                .unwrap()
        })
        .collect();
    for (s, d) in shards.iter().zip(&devices) {
        assert_eq!(s.device().unwrap().id(), d.id());
    }
    let args: Vec<Vec<_>> = shards.iter().map(|b| vec![b]).collect();
    let outs = exe.execute_sharded(&args).unwrap();
    assert_eq!(outs.len(), 4);
    let total: f64 = x.iter().map(|&v| f64::from(v)).sum();
    for (i, o) in outs.iter().enumerate() {
        let sq = o[0].to_host::<f32>().unwrap();
        assert_eq!(sq.len(), 4, "per-device shard");
        for k in 0..4 {
            let v = f64::from(x[4 * i + k]);
            assert!((f64::from(sq[k]) - v * v).abs() < 1e-6);
        }
        let s = o[1].to_host::<f32>().unwrap();
        assert!(
            (f64::from(s[0]) - total).abs() < 1e-4,
            "device {i}: {} vs {total}",
            s[0]
        );
    }
    // Wrong number of argument lists is refused before the plugin sees it.
    assert!(exe.execute_sharded(&args[..2]).is_err());
}

#[test]
fn buffer_round_trips_every_dtype() {
    use half::{bf16, f16};
    use pjrt::NativeType;
    let c = client();
    fn check<T: NativeType + PartialEq + std::fmt::Debug>(c: &Client, data: Vec<T>) {
        let dims = [2i64, (data.len() / 2) as i64];
        let b = c.buffer_from_host(&data, &dims, None).unwrap();
        assert_eq!(b.element_type().unwrap(), T::TYPE);
        assert_eq!(b.dims().unwrap(), dims.to_vec());
        assert_eq!(b.to_host::<T>().unwrap(), data, "{}", T::TYPE);
        assert_eq!(
            b.to_host_bytes().unwrap().len(),
            data.len() * T::TYPE.byte_size()
        );
        assert!(b.on_device_size().unwrap() >= data.len() * T::TYPE.byte_size());
        let wrong = if T::TYPE == ElementType::F32 {
            b.to_host::<i32>().map(|_| ())
        } else {
            b.to_host::<f32>().map(|_| ())
        };
        assert!(matches!(wrong, Err(Error::Shape(_))));
    }
    let n: i32 = 6;
    check(
        &c,
        (0..n).map(|i| i as f32 * 1.25 - 2.0).collect::<Vec<f32>>(),
    );
    check(&c, (0..n).map(|i| i as f64 * -0.3).collect::<Vec<f64>>());
    check(
        &c,
        (0..n)
            .map(|i| bf16::from_f32(i as f32 * 0.5))
            .collect::<Vec<_>>(),
    );
    check(
        &c,
        (0..n)
            .map(|i| f16::from_f32(i as f32 - 2.5))
            .collect::<Vec<_>>(),
    );
    check(&c, (0..n).map(|i| i * -7).collect::<Vec<i32>>());
    check(&c, (0..n).map(|i| (i as i64) << 40).collect::<Vec<i64>>());
    check(&c, (0..n).map(|i| i as i8 - 3).collect::<Vec<i8>>());
    check(&c, (0..n).map(|i| i as i16 * 1000).collect::<Vec<i16>>());
    check(&c, (0..n).map(|i| i as u8 * 40).collect::<Vec<u8>>());
    check(&c, (0..n).map(|i| i as u16 * 9000).collect::<Vec<u16>>());
    check(&c, (0..n).map(|i| i as u32 * 70000).collect::<Vec<u32>>());
    check(&c, (0..n).map(|i| (i as u64) << 50).collect::<Vec<u64>>());
    check(&c, (0..n).map(|i| i % 3 == 0).collect::<Vec<bool>>());
    // Scalars and length mismatches.
    let s = c.buffer_from_host(&[42i32], &[], None).unwrap();
    assert_eq!(s.dims().unwrap(), Vec::<i64>::new());
    assert_eq!(s.to_host::<i32>().unwrap(), vec![42]);
    assert!(matches!(
        c.buffer_from_host(&[1.0f32; 3], &[2, 2], None),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        c.buffer_from_host(&[1.0f32; 3], &[-3], None),
        Err(Error::Shape(_))
    ));
    // Copy to another device.
    let d3 = &c.addressable_devices().unwrap()[3];
    let moved = s.copy_to_device(d3).unwrap();
    assert_eq!(moved.device().unwrap().id(), 3);
    assert_eq!(moved.to_host::<i32>().unwrap(), vec![42]);
}

fn affine(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    let scale = frame.attr_f64("scale")?;
    let offset = frame.attr_i64("offset")?;
    let name = frame.attr_str("name")?;
    let arr = frame.attr_array_i64("arr")?;
    let flag = frame.attr_bool("flag")?;
    if frame.attr_names() != ["arr", "flag", "name", "offset", "scale"] {
        return Err(FfiError::invalid_argument(format!(
            "attr names {:?}",
            frame.attr_names()
        )));
    }
    let x = frame.arg(0)?;
    let xs = x.as_slice::<f32>()?;
    let extra: i64 = arr.iter().sum();
    let mut rets = frame.rets_mut()?;
    if rets.len() != 2 {
        return Err(FfiError::invalid_argument("expected two results"));
    }
    let (first, second) = rets.split_at_mut(1);
    let y = first[0].as_mut_slice::<f32>()?;
    let z = second[0].as_mut_slice::<f32>()?;
    for i in 0..xs.len() {
        y[i] = (f64::from(xs[i]) * scale + offset as f64 + extra as f64) as f32;
        z[i] = if flag { xs[i] * name.len() as f32 } else { 0.0 };
    }
    Ok(())
}
pjrt::ffi_handler!(AFFINE, affine);

fn failing(frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    let code = frame.attr_i64("code")?;
    Err(FfiError::failed_precondition(format!(
        "kernel refused: code={code}"
    )))
}
pjrt::ffi_handler!(FAILING, failing);

fn panicking(_frame: &mut CallFrame<'_>) -> Result<(), FfiError> {
    panic!("deliberate test panic")
}
pjrt::ffi_handler!(PANICKING, panicking);

fn custom_call_module(target: &str, attrs: &str) -> String {
    format!(
        r#"
module @cc_{target} {{
  func.func public @main(%x: tensor<8xf32>) -> (tensor<8xf32>, tensor<8xf32>) {{
    %0:2 = stablehlo.custom_call @{target}(%x) {{api_version = 4 : i32, backend_config = {{{attrs}}}}} : (tensor<8xf32>) -> (tensor<8xf32>, tensor<8xf32>)
    return %0#0, %0#1 : tensor<8xf32>, tensor<8xf32>
  }}
}}"#
    )
}

#[test]
fn ffi_handler_with_attributes() {
    let c = client();
    c.register_ffi_handler("rt_affine", AFFINE).unwrap();
    // Same handler again: a no-op. A different handler for the same target: refused.
    c.register_ffi_handler("rt_affine", AFFINE).unwrap();
    assert!(matches!(
        c.register_ffi_handler("rt_affine", FAILING),
        Err(Error::Ffi(_))
    ));
    let module = custom_call_module(
        "rt_affine",
        r#"scale = 2.5 : f32, offset = -3 : i64, name = "hello", arr = array<i64: 1, 2, 4>, flag = true"#,
    );
    let exe = c
        .compile(Program::Mlir(&module), &CompileOptions::default())
        .unwrap();
    let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.75 - 1.0).collect();
    let bx = c.buffer_from_host(&x, &[8], None).unwrap();
    let out = exe.execute(&[&bx]).unwrap();
    let y = out[0].to_host::<f32>().unwrap();
    let z = out[1].to_host::<f32>().unwrap();
    for i in 0..8 {
        let xi = f64::from(x[i]);
        assert!(
            (f64::from(y[i]) - (xi * 2.5 - 3.0 + 7.0)).abs() < 1e-5,
            "y[{i}] = {}",
            y[i]
        );
        assert!(
            (f64::from(z[i]) - xi * 5.0).abs() < 1e-5,
            "z[{i}] = {}",
            z[i]
        );
    }
    // The handler also runs from a deserialized executable.
    let again = c.deserialize_executable(&exe.serialize().unwrap()).unwrap();
    let out2 = again.execute(&[&bx]).unwrap();
    assert_eq!(out2[0].to_host::<f32>().unwrap(), y);
}

#[test]
fn ffi_error_and_panic_come_back_through_execute() {
    let c = client();
    c.register_ffi_handler("rt_failing", FAILING).unwrap();
    c.register_ffi_handler("rt_panicking", PANICKING).unwrap();
    let x = c.buffer_from_host(&[0.0f32; 8], &[8], None).unwrap();

    // The custom call `target` with `attrs` on `x`: the code and message of its error.
    let error_of = |target: &str, attrs: &str| {
        let exe = c
            .compile(
                Program::Mlir(&custom_call_module(target, attrs)),
                &CompileOptions::default(),
            )
            .unwrap();
        match exe.execute(&[&x]) {
            Err(Error::Pjrt { code, message, .. }) => (code, message),
            other => panic!("expected an error from {target}, got {other:?}"),
        }
    };
    let (code, message) = error_of("rt_failing", "code = 42 : i64");
    assert_eq!(code, ErrorCode::FailedPrecondition);
    assert!(message.contains("kernel refused: code=42"), "{message}");
    let (code, message) = error_of("rt_panicking", "");
    assert_eq!(code, ErrorCode::Internal);
    assert!(message.contains("deliberate test panic"), "{message}");
    // The process is still fine.
    assert_eq!(x.to_host::<f32>().unwrap(), vec![0.0; 8]);
}

#[test]
fn ffi_registration_on_wrong_platform_is_detected() {
    let c = client();
    // XLA accepts the registration for a platform this plugin does not serve...
    c.plugin()
        .register_ffi_handler("rt_cuda_only", "CUDA", AFFINE)
        .unwrap();
    // ...but the target is not usable on the CPU client, which the probe compile reports.
    assert!(matches!(
        c.check_ffi_target("rt_cuda_only"),
        Err(Error::Ffi(_))
    ));
    assert!(matches!(
        c.check_ffi_target("rt_never_registered"),
        Err(Error::Ffi(_))
    ));
    assert!(c.plugin().register_ffi_handler("", "cpu", AFFINE).is_err());
}

#[test]
fn serialize_deserialize_execute() {
    let c = client();
    let exe = c
        .compile(
            Program::Hlo(&hlo::add_mul_module(3)),
            &CompileOptions::default(),
        )
        .unwrap();
    let bytes = exe.serialize().unwrap();
    assert!(!bytes.is_empty());
    let back = c.deserialize_executable(&bytes).unwrap();
    let a = c.buffer_from_host(&[1.0f32, 2.0, 3.0], &[3], None).unwrap();
    let b = c.buffer_from_host(&[4.0f32, 5.0, 6.0], &[3], None).unwrap();
    let got = back.execute(&[&a, &b]).unwrap()[0]
        .to_host::<f32>()
        .unwrap();
    let want: Vec<f32> = (0..3)
        .map(|i| ((1.0 + i as f64) + (4.0 + i as f64)) as f32 * (4.0 + i as f32))
        .collect();
    assert_eq!(got, want);
    assert!(c.deserialize_executable(b"not an executable").is_err());
}

#[test]
fn bad_compile_options_are_refused() {
    let c = client();
    let hlo = hlo::add_mul_module(4);
    let bad = [
        CompileOptions {
            num_replicas: 0,
            ..Default::default()
        },
        CompileOptions {
            num_partitions: 0,
            ..Default::default()
        },
        CompileOptions {
            num_partitions: 8,
            use_spmd_partitioning: true,
            ..Default::default()
        },
        CompileOptions {
            num_partitions: 4,
            ..Default::default()
        },
        CompileOptions {
            use_shardy_partitioner: true,
            ..Default::default()
        },
        CompileOptions {
            device_assignment: Some(vec![vec![9]]),
            ..Default::default()
        },
        CompileOptions {
            device_assignment: Some(vec![vec![0, 1]]),
            ..Default::default()
        },
    ];
    for o in &bad {
        assert!(
            matches!(
                c.compile(Program::Hlo(&hlo), o),
                Err(Error::InvalidOptions(_))
            ),
            "{o:?} accepted"
        );
    }
    // Garbage programs are clean plugin errors.
    assert!(matches!(
        c.compile(Program::Hlo(b"\x08\x01garbage"), &CompileOptions::default()),
        Err(Error::Pjrt { .. })
    ));
    assert!(matches!(
        c.compile(
            Program::Mlir("this is not mlir"),
            &CompileOptions::default()
        ),
        Err(Error::Pjrt { .. })
    ));
    // An explicit, valid device assignment works.
    let o = CompileOptions {
        device_assignment: Some(vec![vec![2]]),
        ..Default::default()
    };
    let exe = c.compile(Program::Hlo(&hlo), &o).unwrap();
    assert_eq!(exe.addressable_devices()[0].id(), 2);
}

#[test]
fn missing_plugin_path_is_a_clear_error() {
    let err = pjrt::Plugin::load("/nonexistent/dir/pjrt_plugin.so").unwrap_err();
    assert!(matches!(err, Error::Load { .. }));
    assert!(
        err.to_string().contains("/nonexistent/dir/pjrt_plugin.so"),
        "{err}"
    );
    let err = pjrt::install::PluginCache::default()
        .locate(
            Some(std::path::Path::new("/nonexistent/x.so")),
            pjrt::install::PluginKind::Cpu,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Load { .. }));
    // A file that is not a shared library.
    let not_lib = std::env::temp_dir().join(format!("pjrt-not-a-plugin-{}.so", std::process::id()));
    std::fs::write(&not_lib, b"nope").unwrap();
    assert!(matches!(
        pjrt::Plugin::load(&not_lib),
        Err(Error::Load { .. })
    ));
    let _ = std::fs::remove_file(&not_lib);
}

#[test]
fn donation_reuses_input_memory() {
    let c = client();
    let module = r#"
module @donate {
  func.func public @main(%x: tensor<1024xf32> {tf.aliasing_output = 0 : i32}) -> tensor<1024xf32> {
    %one = stablehlo.constant dense<1.0> : tensor<1024xf32>
    %0 = stablehlo.add %x, %one : tensor<1024xf32>
    return %0 : tensor<1024xf32>
  }
}"#;
    let exe = c
        .compile(Program::Mlir(module), &CompileOptions::default())
        .unwrap();
    let x: Vec<f32> = (0..1024).map(|i| i as f32).collect();
    let want: Vec<f32> = x.iter().map(|v| v + 1.0).collect();
    // Borrowed arguments are never donated: the input stays readable.
    let b = c.buffer_from_host(&x, &[1024], None).unwrap();
    let out = exe.execute(&[&b]).unwrap();
    assert_eq!(out[0].to_host::<f32>().unwrap(), want);
    assert!(!b.is_deleted().unwrap());
    assert_eq!(b.to_host::<f32>().unwrap(), x);
    // Donated: the output lives in the input's memory.
    let addr = b.device_address().unwrap();
    let out = exe.execute_donating(vec![b]).unwrap();
    assert_eq!(out[0].to_host::<f32>().unwrap(), want);
    assert_eq!(
        out[0].device_address().unwrap(),
        addr,
        "donation did not reuse the input buffer"
    );
}
