//! What every compile does before it calls the plugin, for clients (`PJRT_Client_Compile`) and
//! topologies (`PJRT_Compile`) alike: refuse the options that would abort the plugin, check the
//! device assignment against the devices there are, and lay out the program and options in the
//! C form.

use crate::error::{Error, Result};
use crate::options::{CompileOptions, Program};
use crate::sys;

/// A program and its encoded options, checked and ready for the plugin.
pub(crate) struct Prepared<'a> {
    code: &'a [u8],
    format: &'static str,
    /// The serialized `xla.CompileOptionsProto`.
    pub(crate) options: Vec<u8>,
}

impl Prepared<'_> {
    /// The `PJRT_Program` pointing into this value (keep it alive while the plugin runs).
    pub(crate) fn program(&self) -> sys::Program {
        let mut p = sys::Program::new();
        // The plugin does not write through `code`.
        p.code = self.code.as_ptr() as *mut u8;
        p.code_size = self.code.len();
        p.format = self.format.as_ptr();
        p.format_size = self.format.len();
        p
    }
}

/// Checks `options` and `program` for compiling on the devices `device_ids` of `owner` (`"this
/// client"`, `"topology \"v5e:2x2\""`); `context` is appended to option errors that depend on
/// the devices.
pub(crate) fn prepare<'a>(
    program: Program<'a>,
    options: &CompileOptions,
    device_ids: &[i32],
    owner: &str,
    context: Option<&str>,
) -> Result<Prepared<'a>> {
    options
        .validate(device_ids.len())
        .map_err(|e| match (e, context) {
            (Error::InvalidOptions(m), Some(c)) => Error::InvalidOptions(format!("{m} ({c})")),
            (e, _) => e,
        })?;
    options.validate_for_program(&program)?;
    if let Some(da) = &options.device_assignment {
        for id in da.iter().flatten() {
            if !device_ids.iter().any(|&d| i64::from(d) == *id) {
                return Err(Error::InvalidOptions(format!(
                    "device_assignment names device id {id}, which {owner} does not have (ids: {device_ids:?})"
                )));
            }
        }
    }
    let (code, format): (&[u8], &'static str) = match program {
        Program::Hlo(bytes) => (bytes, "hlo"),
        Program::Mlir(text) => (text.as_bytes(), "mlir"),
    };
    if code.is_empty() {
        return Err(Error::InvalidArgument(
            "cannot compile an empty program".into(),
        ));
    }
    Ok(Prepared {
        code,
        format,
        options: options.encode(),
    })
}
