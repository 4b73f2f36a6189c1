//! Running a program on several CPU devices in one process (the CPU plugin's
//! `cpu_device_count`), one argument list per device: what the manual-region tests of
//! pallas-port (`region.rs`, `seq_region.rs`) and model (`seq_parallel.rs`, which includes this
//! file by path) share.
#![allow(dead_code)]

use hlo_builder::{Computation, Sharding};

/// Devices of the process-wide client.
pub const DEVICES: usize = 8;

/// The process-wide CPU client with [`DEVICES`] devices and the RLA kernels registered.
pub fn client() -> &'static pjrt::Client {
    static C: std::sync::OnceLock<pjrt::Client> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        let c = pjrt::Client::new(
            &pjrt::cpu_plugin().expect("CPU plugin"),
            &[("cpu_device_count", pjrt::NamedValue::I64(DEVICES as i64))],
        )
        .expect("client");
        pallas_port::register_cpu_kernels(&c).expect("register RLA kernels");
        c
    })
}

/// Compiles `comp` for `n` devices: SPMD partitioning over devices `0..n` when `n > 1`, the
/// default 1-device options otherwise.
pub fn compile(comp: &Computation, n: usize) -> pjrt::LoadedExecutable {
    let options = if n > 1 {
        pjrt::CompileOptions {
            device_assignment: Some(vec![(0..n as i64).collect()]),
            ..pjrt::CompileOptions::spmd(n)
        }
    } else {
        pjrt::CompileOptions::default()
    };
    client()
        .compile(pjrt::Program::Hlo(&comp.to_bytes()), &options)
        .unwrap_or_else(|e| panic!("compiling {} for {n} devices: {e}", comp.name()))
}

/// The optimized program of `exe` as HLO text.
pub fn optimized_hlo(exe: &pjrt::LoadedExecutable) -> String {
    hlo_builder::print_module_bytes(&exe.optimized_program().unwrap()).unwrap()
}

/// Runs `exe` on `n` devices: each input `(values, dims, layout)` is cut by its layout and
/// device `d` receives only its piece (asserted); each output `(dims, layout)` is assembled
/// from the devices' pieces.
pub fn run(
    exe: &pjrt::LoadedExecutable,
    n: usize,
    inputs: &[(&[f32], &[usize], &Sharding)],
    outputs: &[(&[usize], &Sharding)],
) -> Vec<Vec<f32>> {
    let c = client();
    let devices = c.addressable_devices().unwrap();
    let mut lists: Vec<Vec<pjrt::Buffer>> = (0..n).map(|_| Vec::new()).collect();
    for &(data, dims, sh) in inputs {
        let pieces = sh.split_host(data, dims, n).unwrap();
        let piece_dims: Vec<i64> = sh
            .shard_dims(dims)
            .unwrap()
            .iter()
            .map(|&x| x as i64)
            .collect();
        for (dev, piece) in pieces.iter().enumerate() {
            let buf = c
                .buffer_from_host(piece, &piece_dims, Some(&devices[dev]))
                .unwrap();
            assert_eq!(
                buf.dims().unwrap(),
                piece_dims,
                "device {dev} gets its piece only"
            );
            lists[dev].push(buf);
        }
    }
    let refs: Vec<Vec<&pjrt::Buffer>> = lists.iter().map(|l| l.iter().collect()).collect();
    let outs = exe.execute_sharded(&refs).expect("execute");
    outputs
        .iter()
        .enumerate()
        .map(|(i, &(dims, sh))| {
            let pieces: Vec<Vec<f32>> = outs
                .iter()
                .take(n)
                .map(|l| l[i].to_host::<f32>().unwrap())
                .collect();
            sh.assemble_host(&pieces, dims).unwrap()
        })
        .collect()
}
