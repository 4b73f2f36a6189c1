//! How the inspect reports write bytes and counts: the binary units and their rounding, SI
//! prefixes for FLOPs and parameter counts, and `n/a` for numbers a plugin did not report. Every
//! byte or count that `rattn dump` and `rattn compile` print goes through here.

const KIB: f64 = 1024.0;
const MIB: f64 = KIB * 1024.0;
const GIB: f64 = MIB * 1024.0;

/// Bytes in the largest binary unit that keeps the number at least 1, GiB with two decimals and
/// smaller units with one: `92.13 GiB`, `5.1 MiB`, `3.0 KiB`. `rattn compile` writes its memory
/// this way.
pub fn bytes(b: i64) -> String {
    let x = b as f64;
    if x.abs() >= GIB {
        format!("{:.2} GiB", x / GIB)
    } else if x.abs() >= MIB {
        format!("{:.1} MiB", x / MIB)
    } else {
        format!("{:.1} KiB", x / KIB)
    }
}

/// Exact bytes with their size in MiB: `2469644 B (2.36 MiB)`. `rattn dump` writes its memory and
/// cache sizes this way.
pub fn bytes_exact(b: u64) -> String {
    format!("{b} B ({:.2} MiB)", b as f64 / MIB)
}

/// A count with an SI prefix (K, M, G, T) and three decimals: `1.481 MFLOP`, `205.760 K`.
pub fn si(x: f64, unit: &str) -> String {
    let (v, prefix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")]
        .into_iter()
        .find(|&(scale, _)| x.abs() >= scale)
        .map(|(scale, prefix)| (x / scale, prefix))
        .unwrap_or((x, ""));
    format!("{v:.3} {prefix}{unit}")
}

/// A number a plugin may not report, in scientific notation with four decimals (`1.2346e10`),
/// or `n/a`.
pub fn scientific(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |x| format!("{x:.4e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_pick_the_unit_and_its_rounding() {
        assert_eq!(bytes(98_924_000_000), "92.13 GiB");
        assert_eq!(bytes(5 * 1024 * 1024 + 100 * 1024), "5.1 MiB");
        assert_eq!(bytes(3 * 1024), "3.0 KiB");
        assert_eq!(bytes(0), "0.0 KiB");
        assert_eq!(bytes(-2 * (1 << 30)), "-2.00 GiB");
        assert_eq!(bytes_exact(2_469_644), "2469644 B (2.36 MiB)");
    }

    #[test]
    fn counts_take_si_prefixes_and_missing_numbers_read_na() {
        assert_eq!(si(1_481_000.0, "FLOP"), "1.481 MFLOP");
        assert_eq!(si(205_760.0, ""), "205.760 K");
        assert_eq!(si(12.0, "FLOP"), "12.000 FLOP");
        assert_eq!(si(2.5e13, "FLOP"), "25.000 TFLOP");
        assert_eq!(scientific(Some(86_600_000_000_000.0)), "8.6600e13");
        assert_eq!(scientific(None), "n/a");
    }
}
