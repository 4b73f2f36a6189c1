//! Plugin provisioning: download a pinned PyPI wheel with `pip download --no-deps`, unzip the
//! plugin shared library, verify its SHA-256 and cache it.
//!
//! Layout: `<cache dir>/<package>-<version>/<library file>`, plus `<library file>.sha256` (written
//! only after verification) and `<package>-<version>/.install.lock` (an exclusive file lock held
//! while installing). The library is written under a temporary name and renamed into place, so
//! concurrent callers (threads or processes) either see a complete, verified file or wait.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::plugin::Plugin;

/// The environment variable that lets the ahead-of-time compile tests install the plugins they
/// need (`RATTN_AOT_TESTS=1`; see [`PluginCache::ready_for_test`]).
pub const AOT_TESTS_VAR: &str = "RATTN_AOT_TESTS";

/// Which plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PluginKind {
    /// XLA's CPU plugin (PyPI `lammps-jax-pjrt-cpu` 0.11.2, PJRT API 0.115).
    Cpu,
    /// XLA's CUDA 13 plugin (PyPI `jax-cuda13-pjrt` 0.12.0.1, PJRT API 0.116). Compiles without a
    /// GPU given a target spec; needs `ptxas`/libdevice (see the GPU notes).
    Cuda,
    /// `libtpu` 0.0.52 (PJRT API 0.117). Reads its environment when loaded: see
    /// [`crate::tpu::set_environment`].
    Tpu,
}

/// A pinned wheel and the plugin library inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    /// PyPI package name.
    pub package: &'static str,
    /// Exact version.
    pub version: &'static str,
    /// Path of the shared library inside the wheel.
    pub member: &'static str,
    /// Size of the shared library in bytes.
    pub size: u64,
    /// SHA-256 (hex) of the shared library.
    pub sha256: &'static str,
    /// SHA-256 (hex) of the wheel file.
    pub wheel_sha256: &'static str,
    /// Extra `pip download` arguments (e.g. the Python version a wheel is tagged for).
    pub pip_args: &'static [&'static str],
}

impl PluginKind {
    /// Every kind.
    pub const ALL: [PluginKind; 3] = [PluginKind::Cpu, PluginKind::Cuda, PluginKind::Tpu];

    /// The lower-case name (`cpu`, `cuda`, `tpu`).
    pub fn name(self) -> &'static str {
        match self {
            PluginKind::Cpu => "cpu",
            PluginKind::Cuda => "cuda",
            PluginKind::Tpu => "tpu",
        }
    }

    /// Parses [`PluginKind::name`].
    pub fn from_name(s: &str) -> Option<PluginKind> {
        PluginKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
    }

    /// The pinned package. All three were downloaded and measured when the pins were recorded.
    pub fn pin(self) -> Pin {
        match self {
            PluginKind::Cpu => Pin {
                package: "lammps-jax-pjrt-cpu",
                version: "0.11.2",
                member: "lammps_jax_pjrt_cpu/pjrt_c_api_cpu_plugin.so",
                size: 201_600_336,
                sha256: "ad1309ac822b1b24d51b7f9947c7c9fa9ef5d67f390584cbc3d1fa2428fed9c2",
                wheel_sha256: "1319390d948b39f69f7dade496b7c385149d9ca6097a6b62114da113216d9ad1",
                pip_args: &[],
            },
            PluginKind::Cuda => Pin {
                package: "jax-cuda13-pjrt",
                version: "0.12.0.1",
                member: "jax_plugins/xla_cuda13/xla_cuda_plugin.so",
                size: 395_967_648,
                sha256: "b6de513893c09af2c77e71afcef46d9706f8c259337cdef4cd5cae2353886f75",
                wheel_sha256: "5899bb6177eda86ea532afb9a26794f2bdd04966f6a01f9028266b16c2b6cf90",
                pip_args: &[],
            },
            PluginKind::Tpu => Pin {
                package: "libtpu",
                version: "0.0.52",
                member: "libtpu/libtpu.so",
                size: 467_479_448,
                sha256: "f86de4d04a058e6b5101f73e0824b95f27e2cec996d2b9191d9cffda75c03077",
                wheel_sha256: "f5e2e596eaea9357fbb5a6755a7a9007c6ab75bfde4a55191b03eff402971140",
                // The wheel is tagged cp311; ask for it whatever the local Python is.
                pip_args: &["--only-binary=:all:", "--python-version", "3.11"],
            },
        }
    }

    fn dir_name(self) -> String {
        let p = self.pin();
        format!("{}-{}", p.package, p.version)
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A plugin cache: the directory that [`PluginCache::install`] fills and [`PluginCache::locate`]
/// searches, and the pip program that downloads the wheels.
///
/// Nothing here reads the caller's configuration: a program that lets its users choose the
/// directory (an environment variable, a flag) builds the cache with [`PluginCache::new`].
/// [`PluginCache::default`] is `$XDG_CACHE_HOME/rattention/plugins`, else
/// `~/.cache/rattention/plugins`.
///
/// ```no_run
/// use pjrt::install::{PluginCache, PluginKind};
/// let cache = PluginCache::default();
/// let libtpu = cache.install(PluginKind::Tpu)?; // pip download, verify, cache (once)
/// assert_eq!(cache.installed(PluginKind::Tpu), Some(libtpu));
/// # Ok::<(), pjrt::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginCache {
    dir: PathBuf,
    pip: Option<PathBuf>,
}

impl Default for PluginCache {
    fn default() -> Self {
        PluginCache::new(PluginCache::default_dir())
    }
}

impl PluginCache {
    /// A cache in `dir` (the directory that holds `<package>-<version>/` folders).
    pub fn new(dir: impl Into<PathBuf>) -> PluginCache {
        PluginCache {
            dir: dir.into(),
            pip: None,
        }
    }

    /// The default directory: `$XDG_CACHE_HOME/rattention/plugins` when `XDG_CACHE_HOME` is set,
    /// else `~/.cache/rattention/plugins`.
    pub fn default_dir() -> PathBuf {
        if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(xdg).join("rattention").join("plugins");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        home.join(".cache").join("rattention").join("plugins")
    }

    /// Downloads with this pip program first (then `pip`, `pip3`, `python3 -m pip` as always).
    pub fn with_pip(mut self, program: impl Into<PathBuf>) -> PluginCache {
        self.pip = Some(program.into());
        self
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The installed, verified library of `kind`, if present (checks size and the verification
    /// marker; does not re-hash the file).
    pub fn installed(&self, kind: PluginKind) -> Option<PathBuf> {
        installed_at(&kind.pin(), &self.dir.join(kind.dir_name()))
    }

    /// Whether a test named `test` that needs plugin `kind` (and, for [`PluginKind::Cuda`],
    /// ptxas and libdevice) can run. With [`AOT_TESTS_VAR`]` = 1` it installs whatever is missing
    /// and answers `true` (an install error is returned); otherwise it answers whether all is
    /// installed, printing `skip <test>: … (set RATTN_AOT_TESTS=1 to install and run)` when not.
    /// The ahead-of-time compile tests of every crate start with it.
    pub fn ready_for_test(&self, kind: PluginKind, test: &str) -> Result<bool> {
        let cuda = kind == PluginKind::Cuda;
        if std::env::var(AOT_TESTS_VAR).is_ok_and(|v| v == "1") {
            self.install(kind)?;
            if cuda {
                self.install_cuda_tools()?;
            }
            return Ok(true);
        }
        let ready =
            self.installed(kind).is_some() && (!cuda || self.installed_cuda_tools().is_some());
        if !ready {
            let what = match kind {
                PluginKind::Tpu => "libtpu not installed",
                PluginKind::Cuda => "the CUDA plugin or ptxas/libdevice is not installed",
                PluginKind::Cpu => "the CPU plugin is not installed",
            };
            eprintln!("skip {test}: {what} (set {AOT_TESTS_VAR}=1 to install and run)");
        }
        Ok(ready)
    }

    /// [`PluginCache::ready_for_test`], then [`PluginCache::load`]: the plugin of `kind` for the
    /// test named `test`, or `None` (the skip line printed) when it is not installed and
    /// [`AOT_TESTS_VAR`] is not `1`. Set the plugin's environment first.
    pub fn load_for_test(&self, kind: PluginKind, test: &str) -> Result<Option<Plugin>> {
        if !self.ready_for_test(kind, test)? {
            return Ok(None);
        }
        self.load(kind).map(Some)
    }

    /// Every installed plugin.
    pub fn list(&self) -> Vec<(PluginKind, PathBuf)> {
        PluginKind::ALL
            .into_iter()
            .filter_map(|k| self.installed(k).map(|p| (k, p)))
            .collect()
    }

    /// Installs `kind` (no-op if already installed) and returns the library path.
    ///
    /// Runs `pip download --no-deps <package>==<version>` (the program of
    /// [`PluginCache::with_pip`], else `pip`, `pip3` or `python3 -m pip` from `PATH`), checks the
    /// wheel's and the library's SHA-256 against the pins, and renames the verified library into
    /// place under an exclusive lock.
    pub fn install(&self, kind: PluginKind) -> Result<PathBuf> {
        install_pin(
            &kind.pin(),
            &self.dir.join(kind.dir_name()),
            &|pin: &Pin, dest: &Path| pip_download(self.pip.as_deref(), pin, dest),
        )
    }

    /// The CUDA root that holds the tools of [`cuda_tool_pins`]: `<dir>/nvidia/cu13`, with
    /// `bin/ptxas` and `nvvm/libdevice/libdevice.10.bc`. The CUDA plugin searches
    /// `<plugin dir>/../nvidia/cu13` by itself, which is this directory for a plugin installed
    /// in the same cache.
    pub fn cuda_tools_root(&self) -> PathBuf {
        self.dir.join("nvidia").join("cu13")
    }

    /// The CUDA root of [`PluginCache::cuda_tools_root`] if both tools are installed and
    /// verified.
    pub fn installed_cuda_tools(&self) -> Option<PathBuf> {
        let root = self.cuda_tools_root();
        cuda_tool_pins()
            .iter()
            .all(|(pin, sub)| installed_at(pin, &root.join(sub)).is_some())
            .then_some(root)
    }

    /// Installs `ptxas` and libdevice (see [`cuda_tool_pins`]) into
    /// [`PluginCache::cuda_tools_root`] (no-op when present; same download, checksum and locking
    /// as [`PluginCache::install`]) and returns the root.
    pub fn install_cuda_tools(&self) -> Result<PathBuf> {
        let root = self.cuda_tools_root();
        for (pin, sub) in cuda_tool_pins() {
            install_pin(&pin, &root.join(sub), &|pin: &Pin, dest: &Path| {
                pip_download(self.pip.as_deref(), pin, dest)
            })?;
        }
        Ok(root)
    }

    /// The plugin library to load: `explicit` if given (it must exist), else the installed
    /// library of `kind`. The CPU plugin is installed on first use; CUDA and TPU fail with
    /// [`Error::NotInstalled`] (they are large, so only [`PluginCache::install`] downloads them).
    pub fn locate(&self, explicit: Option<&Path>, kind: PluginKind) -> Result<PathBuf> {
        if let Some(p) = explicit {
            return if p.is_file() {
                Ok(p.to_path_buf())
            } else {
                Err(Error::Load {
                    path: p.to_path_buf(),
                    message: "the explicit plugin path does not name an existing file".into(),
                })
            };
        }
        if let Some(p) = self.installed(kind) {
            return Ok(p);
        }
        match kind {
            PluginKind::Cpu => self.install(kind),
            _ => Err(Error::NotInstalled {
                kind,
                dir: self.dir.clone(),
            }),
        }
    }

    /// [`PluginCache::locate`] (no explicit path) and [`Plugin::load`]: the installed plugin of
    /// `kind`, loaded once per process. libtpu needs its environment first
    /// ([`crate::tpu::set_environment`]).
    pub fn load(&self, kind: PluginKind) -> Result<Plugin> {
        Plugin::load(self.locate(None, kind)?)
    }
}

fn marker_path(lib: &Path) -> PathBuf {
    let mut s = lib.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

fn member_file_name(pin: &Pin) -> &'static str {
    pin.member.rsplit('/').next().unwrap_or(pin.member)
}

fn installed_at(pin: &Pin, dir: &Path) -> Option<PathBuf> {
    let path = dir.join(member_file_name(pin));
    let meta = fs::metadata(&path).ok()?;
    if meta.len() != pin.size {
        return None;
    }
    let marker = fs::read_to_string(marker_path(&path)).ok()?;
    (marker.trim() == pin.sha256).then_some(path)
}

/// Lower-case hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        fs::File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// The download step: fetch the pinned wheel into the given (empty, private) directory.
type Fetch<'a> = &'a (dyn Fn(&Pin, &Path) -> Result<PathBuf> + Sync);

fn install_pin(pin: &Pin, dir: &Path, fetch: Fetch<'_>) -> Result<PathBuf> {
    if let Some(p) = installed_at(pin, dir) {
        return Ok(p);
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let lock_path = dir.join(".install.lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(format!("opening lock {}", lock_path.display()), e))?;
    fs2::FileExt::lock_exclusive(&lock)
        .map_err(|e| Error::io(format!("locking {}", lock_path.display()), e))?;
    // Another thread or process may have finished while we waited.
    if let Some(p) = installed_at(pin, dir) {
        return Ok(p);
    }
    let unique = format!(
        "{}.{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let tmp_dir = dir.join(format!(".download-{unique}"));
    let result = install_locked(pin, dir, &tmp_dir, &unique, fetch);
    let _ = fs::remove_dir_all(&tmp_dir);
    drop(lock);
    result
}

fn install_locked(
    pin: &Pin,
    dir: &Path,
    tmp_dir: &Path,
    unique: &str,
    fetch: Fetch<'_>,
) -> Result<PathBuf> {
    fs::create_dir_all(tmp_dir)
        .map_err(|e| Error::io(format!("creating {}", tmp_dir.display()), e))?;
    let wheel = fetch(pin, tmp_dir)?;
    let wheel_sha = sha256_file(&wheel)?;
    if wheel_sha != pin.wheel_sha256 {
        return Err(Error::Install(format!(
            "{} has SHA-256 {wheel_sha}, expected {} for {}=={}",
            wheel.display(),
            pin.wheel_sha256,
            pin.package,
            pin.version
        )));
    }
    let file =
        fs::File::open(&wheel).map_err(|e| Error::io(format!("opening {}", wheel.display()), e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| Error::Install(format!("{} is not a readable wheel: {e}", wheel.display())))?;
    let mut entry = archive
        .by_name(pin.member)
        .map_err(|e| Error::Install(format!("{} has no {}: {e}", wheel.display(), pin.member)))?;
    let file_name = member_file_name(pin);
    let target = dir.join(file_name);
    let tmp_lib = dir.join(format!(".{file_name}.{unique}.tmp"));
    let mut out = fs::File::create(&tmp_lib)
        .map_err(|e| Error::io(format!("creating {}", tmp_lib.display()), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut written: u64 = 0;
    let copy = (|| -> std::io::Result<()> {
        loop {
            let n = entry.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            written += n as u64;
        }
        out.sync_all()
    })();
    if let Err(e) = copy {
        let _ = fs::remove_file(&tmp_lib);
        return Err(Error::io(
            format!("unpacking {} from {}", pin.member, wheel.display()),
            e,
        ));
    }
    let sha = hex(&h.finalize());
    if sha != pin.sha256 || written != pin.size {
        let _ = fs::remove_file(&tmp_lib);
        return Err(Error::Install(format!(
            "{} from {}=={} has SHA-256 {sha} and {written} bytes, expected {} and {} bytes",
            pin.member, pin.package, pin.version, pin.sha256, pin.size
        )));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(&tmp_lib, fs::Permissions::from_mode(0o755));
    }
    fs::rename(&tmp_lib, &target)
        .map_err(|e| Error::io(format!("renaming into {}", target.display()), e))?;
    let marker = marker_path(&target);
    let tmp_marker = dir.join(format!(".marker.{unique}.tmp"));
    fs::write(&tmp_marker, format!("{}\n", pin.sha256))
        .map_err(|e| Error::io("writing the checksum marker", e))?;
    fs::rename(&tmp_marker, &marker)
        .map_err(|e| Error::io(format!("renaming into {}", marker.display()), e))?;
    Ok(target)
}

fn pip_download(pip: Option<&Path>, pin: &Pin, dest: &Path) -> Result<PathBuf> {
    let spec = format!("{}=={}", pin.package, pin.version);
    let mut candidates: Vec<(String, Vec<String>)> = Vec::new();
    if let Some(p) = pip {
        candidates.push((p.to_string_lossy().into_owned(), Vec::new()));
    }
    candidates.push(("pip".into(), Vec::new()));
    candidates.push(("pip3".into(), Vec::new()));
    candidates.push(("python3".into(), vec!["-m".into(), "pip".into()]));
    let mut failures = Vec::new();
    let mut found_any = false;
    for (program, prefix) in candidates {
        let mut cmd = Command::new(&program);
        cmd.args(&prefix)
            .args([
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                "-d",
            ])
            .arg(dest)
            .args(pin.pip_args)
            .arg(&spec);
        match cmd.output() {
            Err(e) => failures.push(format!("{program}: {e}")),
            Ok(out) if !out.status.success() => {
                found_any = true;
                failures.push(format!(
                    "{program} {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
            Ok(_) => {
                let wheel = fs::read_dir(dest)
                    .map_err(|e| Error::io(format!("listing {}", dest.display()), e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .find(|p| p.extension().is_some_and(|x| x == "whl"));
                return wheel.ok_or_else(|| {
                    Error::Install(format!(
                        "`{program} download {spec}` succeeded but left no .whl in {}",
                        dest.display()
                    ))
                });
            }
        }
    }
    if !found_any {
        return Err(Error::Install(format!(
            "could not download {spec}: no pip on this machine (tried pip, pip3 and python3 -m \
             pip: {}); install pip first (e.g. `apt-get install python3-pip`), or fetch the \
             wheel on another machine (`pip download --no-deps {spec}`), unzip it and pass the \
             plugin library inside as `--plugin PATH`",
            failures.join("; ")
        )));
    }
    Err(Error::Install(format!(
        "could not download {spec}: {}",
        failures.join("; ")
    )))
}

/// The NVIDIA tools the CUDA plugin needs to compile without a local CUDA install: `ptxas`
/// (PyPI `nvidia-cuda-nvcc` 13.0.88) and `libdevice.10.bc` (PyPI `nvidia-nvvm` 13.0.88), pinned to
/// the CUDA 13.0 that the pinned plugin reports (`cuda_version=13000`).
///
/// Each entry is `(pin, directory under the CUDA root)`. Both are NVIDIA-proprietary binaries,
/// downloaded from PyPI, never vendored.
pub fn cuda_tool_pins() -> [(Pin, &'static str); 2] {
    [
        (
            Pin {
                package: "nvidia-cuda-nvcc",
                version: "13.0.88",
                member: "nvidia/cu13/bin/ptxas",
                size: 37_741_528,
                sha256: "daba837a68265cae38c832d13399b61dab811891de9b8914defddef143b849f2",
                wheel_sha256: "56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03",
                pip_args: &["--only-binary=:all:"],
            },
            "bin",
        ),
        (
            Pin {
                package: "nvidia-nvvm",
                version: "13.0.88",
                member: "nvidia/cu13/nvvm/libdevice/libdevice.10.bc",
                size: 464_132,
                sha256: "91334d6e12748f6cb5bbf0a1cd965a56bcd93dc4f496d2e5c5f8c6e523094356",
                wheel_sha256: "c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0",
                pip_args: &["--only-binary=:all:"],
            },
            "nvvm/libdevice",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn fake_wheel(dir: &Path, member: &str, payload: &[u8]) -> PathBuf {
        let path = dir.join("fake-0.1-py3-none-any.whl");
        let mut w = zip::ZipWriter::new(fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        w.start_file("fake/__init__.py", opts).unwrap();
        w.write_all(b"").unwrap();
        w.start_file(member, opts).unwrap();
        w.write_all(payload).unwrap();
        w.finish().unwrap();
        path
    }

    #[test]
    fn an_empty_cache_is_not_ready_for_a_test_unless_forced() {
        if std::env::var(AOT_TESTS_VAR).is_ok_and(|v| v == "1") {
            eprintln!("skip an_empty_cache_is_not_ready_for_a_test_unless_forced: {AOT_TESTS_VAR}=1 would install");
            return;
        }
        let dir = std::env::temp_dir().join(format!("rattn_ready_for_test_{}", std::process::id()));
        let cache = PluginCache::new(&dir);
        for kind in PluginKind::ALL {
            assert!(!cache.ready_for_test(kind, "probe").unwrap(), "{kind:?}");
        }
        assert!(!dir.exists(), "nothing installed");
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    /// Builds a pin for a generated payload and its wheel (the wheel's hash is fixed by building
    /// it once in `probe`).
    fn pin_for(payload: &[u8], probe: &Path) -> Pin {
        let member = "fake/libfake_plugin.so";
        let wheel = fake_wheel(probe, member, payload);
        let wheel_sha = sha256_file(&wheel).unwrap();
        Pin {
            package: "fake",
            version: "0.1",
            member,
            size: payload.len() as u64,
            sha256: leak(hex(&Sha256::digest(payload))),
            wheel_sha256: leak(wheel_sha),
            pip_args: &[],
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pjrt-install-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn concurrent_installs_download_once_and_agree() {
        let root = scratch("race");
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let probe = root.join("probe");
        fs::create_dir_all(&probe).unwrap();
        let pin = pin_for(&payload, &probe);
        let wheel_bytes = fs::read(probe.join("fake-0.1-py3-none-any.whl")).unwrap();
        let downloads = AtomicUsize::new(0);
        let fetch = |_: &Pin, dest: &Path| -> Result<PathBuf> {
            downloads.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(50));
            let p = dest.join("fake-0.1-py3-none-any.whl");
            fs::write(&p, &wheel_bytes).unwrap();
            Ok(p)
        };
        let dir = root.join("cache");
        let paths: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| install_pin(&pin, &dir, &fetch).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            downloads.load(Ordering::SeqCst),
            1,
            "the lock must serialise installs"
        );
        assert!(paths.iter().all(|p| p == &paths[0]));
        assert_eq!(fs::read(&paths[0]).unwrap(), payload);
        assert_eq!(installed_at(&pin, &dir), Some(paths[0].clone()));
        // No temporary files are left behind.
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp") || n.starts_with(".download"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn checksum_mismatch_is_refused_and_leaves_nothing() {
        let root = scratch("badsum");
        let payload = b"real plugin bytes".to_vec();
        let probe = root.join("probe");
        fs::create_dir_all(&probe).unwrap();
        let mut pin = pin_for(&payload, &probe);
        let wheel_bytes = fs::read(probe.join("fake-0.1-py3-none-any.whl")).unwrap();
        let fetch = |_: &Pin, dest: &Path| -> Result<PathBuf> {
            let p = dest.join("w.whl");
            fs::write(&p, &wheel_bytes).unwrap();
            Ok(p)
        };
        let dir = root.join("cache");
        // Wrong library hash.
        pin.sha256 = "00";
        let err = install_pin(&pin, &dir, &fetch).unwrap_err();
        assert!(
            matches!(err, Error::Install(ref m) if m.contains("SHA-256")),
            "{err}"
        );
        assert!(installed_at(&pin, &dir).is_none());
        assert!(!dir.join("libfake_plugin.so").exists());
        // Wrong wheel hash.
        pin.wheel_sha256 = "11";
        assert!(matches!(
            install_pin(&pin, &dir, &fetch),
            Err(Error::Install(_))
        ));
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn pins_are_complete() {
        for k in PluginKind::ALL {
            let p = k.pin();
            assert_eq!(p.sha256.len(), 64, "{k}");
            assert_eq!(p.wheel_sha256.len(), 64, "{k}");
            assert!(p.member.ends_with(".so"));
            assert_eq!(PluginKind::from_name(k.name()), Some(k));
        }
    }
}
