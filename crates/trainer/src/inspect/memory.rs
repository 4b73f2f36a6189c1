//! The memory report of one compiled program, read from pjrt's [`CompiledMemoryStats`]: the
//! numbers both `rattn dump` and `rattn compile` print and write as JSON.

use pjrt::CompiledMemoryStats;
use serde::{Deserialize, Serialize};

/// Memory of one compiled program on one device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Arguments (for the train step: parameters, Adam moments, step, tokens).
    pub argument_bytes: i64,
    /// Outputs.
    pub output_bytes: i64,
    /// Outputs that alias arguments (updated in place).
    pub alias_bytes: i64,
    /// Temporaries.
    pub temp_bytes: i64,
    /// Generated code (0 on GPU and on the CPU plugin).
    pub generated_code_bytes: i64,
    /// Peak per device, arguments and outputs included: [`CompiledMemoryStats::peak_bytes`].
    pub peak_bytes: i64,
}

impl From<&CompiledMemoryStats> for MemoryReport {
    fn from(s: &CompiledMemoryStats) -> MemoryReport {
        MemoryReport {
            argument_bytes: s.argument_size_in_bytes,
            output_bytes: s.output_size_in_bytes,
            alias_bytes: s.alias_size_in_bytes,
            temp_bytes: s.temp_size_in_bytes,
            generated_code_bytes: s.generated_code_size_in_bytes,
            peak_bytes: s.peak_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_pjrts() {
        // The CPU plugin's own peak of the tiny train step is below arguments + outputs +
        // temporaries − aliases; pjrt's peak takes the larger.
        let s = CompiledMemoryStats {
            argument_size_in_bytes: 2_469_644,
            output_size_in_bytes: 2_470_212,
            alias_size_in_bytes: 2_469_120,
            temp_size_in_bytes: 6_104_344,
            peak_memory_in_bytes: 2_470_776,
            ..Default::default()
        };
        let r = MemoryReport::from(&s);
        assert_eq!(r.peak_bytes, s.peak_bytes());
        assert_eq!(r.peak_bytes, 2_469_644 + 2_470_212 + 6_104_344 - 2_469_120);
        assert_eq!(r.argument_bytes, 2_469_644);
        assert_eq!(r.alias_bytes, 2_469_120);
    }
}
