//! TPUs through libtpu: the generations and topology names it accepts, the environment it reads
//! when it is loaded, and [`Topology::tpu`].
//!
//! # Environment
//! libtpu reads its environment once, while it initialises, so the environment is set before
//! it is loaded and before any thread starts: call [`set_environment`] first thing in `main`. It
//! sets, where unset, `TPU_SKIP_MDS_QUERY=1` (otherwise initialisation spends minutes querying a
//! cloud metadata server), `ALLOW_MULTIPLE_LIBTPU_LOAD=1` (so parallel processes do not collide
//! on `/tmp/libtpu_lockfile`), `TPU_STDERR_LOG_LEVEL=3`/`TPU_MIN_LOG_LEVEL=3` (quiet logs, no
//! log files under `/tmp/tpu_logs`), plus `TPU_ACCELERATOR_TYPE=v5litepod-4` and
//! `TPU_WORKER_HOSTNAMES=localhost` (which only silence two start-up warnings). On a machine
//! with TPU chips ([`tpu_chips_present`]) only the multi-process and log settings are made.
//! [`crate::Plugin::load`] refuses to load libtpu on a machine without TPU chips while
//! `TPU_SKIP_MDS_QUERY` is unset.

use crate::error::{Error, ErrorCode, Result};
use crate::plugin::{set_unset_env, NamedValue, Plugin};
use crate::topology::{Topology, TopologyKind};

/// TPU generations that libtpu 0.0.52 accepts in a topology name (`<generation>:<dims>`).
pub const TPU_GENERATIONS: &[&str] = &["v2", "v3", "v4", "v5e", "v5p", "v5", "v6e", "tpu7x"];

/// Example TPU topology names, shown in errors.
pub const TPU_EXAMPLES: &[&str] = &[
    "v5e:2x2",
    "v5e:2x4",
    "v5p:2x2x1",
    "v6e:1x1",
    "v6e:2x2",
    "v4:2x2x1",
    "tpu7x:2x2x1",
];

/// Whether this machine has TPU chips (a PCI device of Google's vendor id 0x1ae0).
pub fn tpu_chips_present() -> bool {
    let Ok(entries) = std::fs::read_dir("/sys/bus/pci/devices") else {
        return false;
    };
    entries.filter_map(|e| e.ok()).any(|e| {
        std::fs::read_to_string(e.path().join("vendor")).is_ok_and(|v| v.trim() == "0x1ae0")
    })
}

/// The variables libtpu should find when it is loaded on this machine, with their values (see
/// the module docs). Reads nothing but the PCI device list.
pub fn environment() -> Vec<(&'static str, &'static str)> {
    let mut vars = vec![
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
        ("TPU_STDERR_LOG_LEVEL", "3"),
        ("TPU_MIN_LOG_LEVEL", "3"),
    ];
    if !tpu_chips_present() {
        vars.push(("TPU_SKIP_MDS_QUERY", "1"));
        // Without these two, libtpu prints start-up warnings that no log level silences. They do
        // not restrict the topologies one can compile for (measured: v4, v5p, v6e, tpu7x).
        vars.push(("TPU_ACCELERATOR_TYPE", "v5litepod-4"));
        vars.push(("TPU_WORKER_HOSTNAMES", "localhost"));
    }
    vars
}

/// Sets each variable of [`environment`] that is unset; variables already set are left alone.
///
/// Call it first thing in `main`, before any thread starts and before libtpu is loaded:
/// changing the environment while another thread reads it is undefined behaviour, and libtpu
/// reads it only when it initialises. Fails with [`Error::Environment`], changing nothing, when
/// the process already runs other threads (where the system can tell); set the variables
/// outside the process then.
pub fn set_environment() -> Result<()> {
    set_unset_env(&environment(), "pjrt::tpu::set_environment")
}

/// Refuses to load libtpu where it would hang: on a machine without TPU chips while
/// `TPU_SKIP_MDS_QUERY` is unset.
pub(crate) fn check_environment() -> Result<()> {
    if std::env::var_os("TPU_SKIP_MDS_QUERY").is_none() && !tpu_chips_present() {
        return Err(Error::Environment(
            "libtpu would spend minutes querying a cloud metadata server while it loads on this machine \
             without TPU chips: set TPU_SKIP_MDS_QUERY=1 in the environment, or call \
             pjrt::tpu::set_environment() first thing in main"
                .into(),
        ));
    }
    Ok(())
}

/// Options of a TPU topology (`PJRT_TopologyDescription_Create` create options). All optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TpuTopologyOptions {
    /// `"megacore"` or `"default"`: on v4 the default is one core per device, on v5p megacore
    /// (two cores per device).
    pub chip_config_name: Option<String>,
    /// Chips per host, e.g. `[2, 2, 1]` (needed for shapes that do not divide the default).
    pub chips_per_host_bounds: Option<[i64; 3]>,
    /// Number of slices (multi-slice); devices get ids from 100000 on.
    pub num_slices: Option<i64>,
}

impl TpuTopologyOptions {
    /// The checked create options.
    fn named_values(&self) -> Result<Vec<(&'static str, NamedValue)>> {
        let mut values = Vec::new();
        if let Some(c) = &self.chip_config_name {
            if c != "megacore" && c != "default" {
                return Err(Error::InvalidArgument(format!(
                    "TPU chip_config_name {c:?}: expected \"megacore\" or \"default\""
                )));
            }
            values.push(("chip_config_name", NamedValue::Str(c.clone())));
        }
        if let Some(b) = self.chips_per_host_bounds {
            if b.iter().any(|&v| v <= 0) {
                return Err(Error::InvalidArgument(format!(
                    "TPU chips_per_host_bounds {b:?} must be positive"
                )));
            }
            values.push(("chips_per_host_bounds", NamedValue::I64List(b.to_vec())));
        }
        if let Some(n) = self.num_slices {
            if n <= 0 {
                return Err(Error::InvalidArgument(format!(
                    "TPU num_slices {n} must be positive"
                )));
            }
            values.push(("num_slices", NamedValue::I64(n)));
        }
        Ok(values)
    }
}

/// "known generations: ...; examples: ...", for errors about names.
fn known_names() -> String {
    format!(
        "known generations: {}; examples: {}",
        TPU_GENERATIONS.join(", "),
        TPU_EXAMPLES.join(", ")
    )
}

/// Checks `<generation>[:=_]<A>x<B>[x<C>][_twisted|_untwisted]` against [`TPU_GENERATIONS`].
/// Needs no plugin, so callers can check a target before loading libtpu.
pub fn check_tpu_name(name: &str) -> Result<()> {
    let bad = |why: String| {
        Error::InvalidArgument(format!(
            "TPU topology {name:?}: {why}; {}. GCP accelerator types (v5litepod-4, v6e-8, v7x) \
             are not topology names",
            known_names()
        ))
    };
    let Some(sep) = name.find([':', '=', '_']) else {
        return Err(bad(
            "expected <generation>:<dims> such as \"v5e:2x2\" (an empty name would silently mean TPU v2)"
                .into(),
        ));
    };
    let generation = &name[..sep];
    if !TPU_GENERATIONS
        .iter()
        .any(|g| g.eq_ignore_ascii_case(generation))
    {
        return Err(bad(format!("unknown TPU generation {generation:?}")));
    }
    let rest = &name[sep + 1..];
    let dims = rest
        .strip_suffix("_untwisted")
        .or_else(|| rest.strip_suffix("_twisted"))
        .unwrap_or(rest);
    let parts: Vec<&str> = dims.split('x').collect();
    let dims_ok = (2..=3).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u32>().is_ok_and(|v| v > 0)
        });
    if !dims_ok {
        return Err(bad(format!(
            "the chip grid {dims:?} must be 2 or 3 positive integers joined by 'x' (\"2x2\", \"2x2x1\")"
        )));
    }
    Ok(())
}

impl Topology {
    /// A TPU topology by name, e.g. `"v5e:2x2"` (4 chips), `"v5p:2x2x1"`, `"v6e:1x1"`. See
    /// [`TPU_GENERATIONS`]; the plugin is libtpu
    /// ([`crate::install::PluginCache::load`]`(PluginKind::Tpu)`).
    pub fn tpu(plugin: &Plugin, name: &str) -> Result<Topology> {
        Self::tpu_with(plugin, name, &TpuTopologyOptions::default())
    }

    /// [`Topology::tpu`] with create options (megacore, chips per host, slices).
    pub fn tpu_with(plugin: &Plugin, name: &str, options: &TpuTopologyOptions) -> Result<Topology> {
        check_tpu_name(name)?;
        let values = options.named_values()?;
        Self::create(plugin, name, &values, TopologyKind::Tpu, None).map_err(|e| match e {
            Error::Pjrt {
                code,
                function,
                message,
            } if code == ErrorCode::InvalidArgument => Error::Pjrt {
                code,
                function,
                message: format!("{message} (topology {name:?}; {})", known_names()),
            },
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpu_names_are_checked() {
        for ok in [
            "v5e:2x2",
            "v5p:2x2x1",
            "v6e:1x1",
            "v4_2x2x1",
            "TPU7x:2x2x1",
            "v5e=2x4",
            "v4:4x4x4_twisted",
        ] {
            check_tpu_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "",
            "bogus",
            "v7x:2x2",
            "v5litepod:2x2",
            "v5e:",
            "v5e:2",
            "v5e:2x0",
            "v5e:2x2x2x2",
            "v5e:axb",
        ] {
            let e = check_tpu_name(bad).unwrap_err().to_string();
            assert!(e.contains("v5e:2x2") && e.contains("tpu7x"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_environment_skips_the_metadata_server_only_without_chips() {
        let vars = environment();
        assert!(vars.contains(&("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")));
        assert_eq!(
            vars.iter().any(|(k, _)| *k == "TPU_SKIP_MDS_QUERY"),
            !tpu_chips_present()
        );
    }

    #[test]
    fn libtpu_is_refused_where_it_would_query_the_metadata_server() {
        let unset = std::env::var_os("TPU_SKIP_MDS_QUERY").is_none();
        let e = check_environment();
        assert_eq!(e.is_err(), unset && !tpu_chips_present(), "{e:?}");
        if let Err(e) = e {
            assert!(e.to_string().contains("pjrt::tpu::set_environment"), "{e}");
        }
    }

    #[test]
    fn bad_create_options_are_refused() {
        for bad in [
            TpuTopologyOptions {
                chip_config_name: Some("huge".into()),
                ..Default::default()
            },
            TpuTopologyOptions {
                chips_per_host_bounds: Some([2, 0, 1]),
                ..Default::default()
            },
            TpuTopologyOptions {
                num_slices: Some(0),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(bad.named_values(), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }
}
