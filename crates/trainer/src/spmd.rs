//! Running a program over the devices of a mesh: a client with enough devices, the SPMD compile
//! options, and host arrays split into (and assembled from) per-device pieces, so each device
//! receives only its shard and nothing is ever copied whole onto a device.
//!
//! Partition `p` of a program runs on device `p` of the client (the device assignment
//! `[0, 1, …, N−1]`), which is the device numbering of the mesh and of the tile assignments of
//! [`model::Mesh::sharding`]. One device is the plain case: default compile options, the whole
//! array on the first device. With several processes (multi-host) the devices are the client's
//! global devices in id order, and each process feeds and reads only the partitions whose devices
//! it can address ([`Placement::local`]).

use anyhow::{bail, Context, Result};
use hlo_builder::{Computation, Sharding};
use pjrt::{Buffer, Client, CompileOptions, Device, LoadedExecutable, NativeType, Program};

/// The devices a program runs on, in partition order, and which of them this process addresses.
#[derive(Debug, Clone)]
pub struct Placement {
    devices: Vec<Device>,
    local: Vec<usize>,
}

/// A client of `plugin` with at least `devices` devices and the RLA kernels registered. On the
/// CPU plugin the client is created with `cpu_device_count = devices` (the one create option
/// this project passes, and only once the platform is known to be the CPU); other plugins must
/// already have that many addressable devices.
pub fn open_client(plugin: Option<&str>, devices: usize) -> Result<Client> {
    if devices == 0 {
        bail!("a mesh needs at least one device");
    }
    let client = crate::runtime::open_client(plugin)?;
    // All devices, of every process (multi-host); the addressable ones with one process.
    let have = client.devices()?.len();
    if devices == 1 || have == devices {
        return Ok(client);
    }
    let platform = client.platform_name()?;
    if platform != "cpu" {
        if have > devices {
            return Ok(client);
        }
        bail!(
            "the mesh spans {devices} devices but the {platform} client has {have} addressable \
             devices"
        );
    }
    let count = i64::try_from(devices).context("device count")?;
    let plugin = client.plugin().clone();
    drop(client);
    let client = Client::new(
        &plugin,
        &[("cpu_device_count", pjrt::NamedValue::I64(count))],
    )?;
    let have = client.addressable_devices()?.len();
    if have != devices {
        bail!("asked the CPU plugin for {devices} devices (cpu_device_count) but it made {have}");
    }
    pallas_port::register_cpu_kernels(&client).context("registering the RLA CPU kernels")?;
    Ok(client)
}

impl Placement {
    /// The first `n` devices of `client` in global id order (with one process: its addressable
    /// devices); partition `p` runs on the `p`-th.
    pub fn new(client: &Client, n: usize) -> Result<Placement> {
        let mut devices = client.devices()?;
        devices.sort_by_key(Device::id);
        if devices.len() < n {
            bail!(
                "the program needs {n} devices but the client has {}",
                devices.len()
            );
        }
        devices.truncate(n);
        let local: Vec<usize> = (0..n).filter(|&p| devices[p].is_addressable()).collect();
        if local.is_empty() {
            bail!("none of the program's {n} devices is addressable from this process");
        }
        Ok(Placement { devices, local })
    }

    /// Number of devices (partitions), in all processes.
    pub fn len(&self) -> usize {
        self.devices.len()
    }

    /// The partitions whose devices this process addresses, ascending (all of them with one
    /// process). Per-device argument and result lists follow this order.
    pub fn local(&self) -> &[usize] {
        &self.local
    }

    /// The device of partition `p`.
    pub fn device(&self, p: usize) -> &Device {
        &self.devices[p]
    }

    /// The compile options: SPMD over the devices (`num_partitions` = N, `num_replicas` = 1,
    /// GSPMD, partition `p` on device `p`), or the 1-device defaults.
    pub fn compile_options(&self) -> CompileOptions {
        let n = self.len();
        if n == 1 {
            return CompileOptions::default();
        }
        CompileOptions {
            device_assignment: Some(vec![self.devices.iter().map(|d| d.id() as i64).collect()]),
            ..CompileOptions::spmd(n)
        }
    }

    /// Compile `comp` for these devices; checks that the executable runs its partitions on
    /// them in this order.
    pub fn compile(&self, client: &Client, comp: &Computation) -> Result<LoadedExecutable> {
        let bytes = comp.to_bytes();
        let exe = client
            .compile(Program::Hlo(&bytes), &self.compile_options())
            .with_context(|| format!("compiling {} for {} devices", comp.name(), self.len()))?;
        let want: Vec<i32> = self.local.iter().map(|&p| self.devices[p].id()).collect();
        let got: Vec<i32> = exe.addressable_devices().iter().map(Device::id).collect();
        if got != want {
            bail!("{} runs on devices {got:?}, expected {want:?}", comp.name());
        }
        Ok(exe)
    }

    /// Upload a row-major host array of `dims` laid out by `sharding`: device `p` receives only
    /// its piece (one buffer per local device, in partition order).
    pub fn upload<T: NativeType + Copy>(
        &self,
        client: &Client,
        data: &[T],
        dims: &[usize],
        sharding: &Sharding,
    ) -> Result<Vec<Buffer>> {
        let pieces = sharding
            .split_host(data, dims, self.len())
            .with_context(|| format!("splitting an array of {dims:?} by {sharding:?}"))?;
        let piece_dims: Vec<i64> = sharding
            .shard_dims(dims)?
            .iter()
            .map(|&d| d as i64)
            .collect();
        self.local
            .iter()
            .map(|&p| {
                Ok(client.buffer_from_host(&pieces[p], &piece_dims, Some(&self.devices[p]))?)
            })
            .collect()
    }

    /// Download the per-device pieces `buffers` (partition order) of an array of `dims` laid
    /// out by `sharding` and assemble the whole row-major array on the host.
    pub fn download<T: NativeType + Copy + Default>(
        buffers: &[&Buffer],
        dims: &[usize],
        sharding: &Sharding,
    ) -> Result<Vec<T>> {
        let pieces = buffers
            .iter()
            .map(|b| Ok(b.to_host::<T>()?))
            .collect::<Result<Vec<_>>>()?;
        Ok(sharding.assemble_host(&pieces, dims)?)
    }
}
