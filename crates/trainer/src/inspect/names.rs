//! File names of a dump, the way XLA's `--xla_dump_to` names them:
//! `module_0000.train_step.before_optimizations.txt` for the module as we built it and
//! `module_0000.train_step.cpu_after_optimizations.hlo.pb` for the program the plugin optimized.

/// When in compilation a module is dumped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage<'a> {
    /// As we built it, before XLA's passes.
    Before,
    /// After XLA's optimizations for `platform` (`cpu`, `tpu`, `gpu`).
    After {
        /// Lower-case platform name, the prefix of `_after_optimizations`.
        platform: &'a str,
    },
}

/// How a dumped module is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// HLO text in XLA's syntax (`.txt`).
    Text,
    /// The serialized `HloModuleProto` (`.hlo.pb`).
    Proto,
}

impl Format {
    /// The file extension, without the leading dot.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Text => "txt",
            Format::Proto => "hlo.pb",
        }
    }
}

/// The file name of module number `index` called `module` at `stage` in `format`.
pub fn file_name(index: usize, module: &str, stage: Stage<'_>, format: Format) -> String {
    let stage = match stage {
        Stage::Before => "before_optimizations".to_string(),
        Stage::After { platform } => format!("{platform}_after_optimizations"),
    };
    format!("module_{index:04}.{module}.{stage}.{}", format.extension())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_xla_dump_to() {
        assert_eq!(
            file_name(0, "train_step", Stage::Before, Format::Text),
            "module_0000.train_step.before_optimizations.txt"
        );
        assert_eq!(
            file_name(1, "decode_step", Stage::Before, Format::Proto),
            "module_0001.decode_step.before_optimizations.hlo.pb"
        );
        assert_eq!(
            file_name(
                0,
                "train_step",
                Stage::After { platform: "tpu" },
                Format::Text
            ),
            "module_0000.train_step.tpu_after_optimizations.txt"
        );
        assert_eq!(
            file_name(
                12,
                "decode_step",
                Stage::After { platform: "cpu" },
                Format::Proto
            ),
            "module_0012.decode_step.cpu_after_optimizations.hlo.pb"
        );
    }
}
