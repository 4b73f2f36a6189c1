//! The cost of a scanned train step (`model.scan_layers`) from two compiles.
//!
//! XLA's cost analysis counts a `while` body once, whatever its trip count, so the cost of a
//! scanned step covers one trip of the layer loop (forward and backward) plus everything outside
//! it. With `u` periods per trip (`model.scan_unroll`, [`hlo_builder::Builder::scan_unrolled`])
//! the counted cost is `outside + u · period` for every additive figure (FLOPs, bytes accessed,
//! transcendentals, libtpu's optimal seconds). Two compiles at `u0` (the program itself) and
//! `u1 > u0` give `period = (c1 − c0) / (u1 − u0)`, and the step of `R` periods costs
//! `c0 + (R − u0) · period`; with the defaults `u0 = 1`, `u1 = 2`: `c1 + (R − 2)·(c1 − c0)`, that
//! is `c0 + (R − 1)·(c1 − c0)`. Memory stays the `u0` program's (the second one is compiled for
//! its cost only).

use serde::{Deserialize, Serialize};

use super::{CostReport, ProgramReport};

/// The additive figures of one compiled program's cost analysis.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LoopCost {
    /// Floating-point operations.
    pub flops: Option<f64>,
    /// Bytes read and written.
    pub bytes_accessed: Option<f64>,
    /// Transcendental operations.
    pub transcendentals: Option<f64>,
    /// libtpu's lower bound on the program's time, seconds.
    pub optimal_seconds: Option<f64>,
}

impl From<&CostReport> for LoopCost {
    fn from(c: &CostReport) -> LoopCost {
        LoopCost {
            flops: c.flops,
            bytes_accessed: c.bytes_accessed,
            transcendentals: c.transcendentals,
            optimal_seconds: c.optimal_seconds,
        }
    }
}

/// The unroll of the second, cost-only compile: `u0 · d` for the smallest divisor `d > 1` of the
/// trips `periods / u0` that leaves at least 2 trips (2 whenever the trips are even). `None` when
/// the loop makes one trip (its body then holds every period and the cost analysis is already
/// the step's) or a prime number of trips: a loop of one trip is inlined by XLA, which may then
/// merge the backward pass's recomputation with the forward, so it cannot serve.
pub fn second_unroll(periods: usize, u0: usize) -> Option<usize> {
    let trips = periods / u0.max(1);
    (2..trips)
        .find(|d| trips.is_multiple_of(*d))
        .map(|d| u0 * d)
}

/// `c0 + (periods − u0) / (u1 − u0) · (c1 − c0)`: the cost of all `periods` from the costs `c0`,
/// `c1` counted with `u0` and `u1` periods in the loop body (see the module docs).
pub fn extrapolate(c0: f64, c1: f64, periods: usize, u0: usize, u1: usize) -> f64 {
    c0 + (periods - u0) as f64 / (u1 - u0) as f64 * (c1 - c0)
}

/// The estimated cost of a scanned train step, and how it was obtained.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanEstimate {
    /// Periods of the layer pattern the scan loops over (`R`).
    pub periods: usize,
    /// Periods per trip of the compiled program (`model.scan_unroll`, `u0`).
    pub unroll: usize,
    /// Periods per trip of the second, cost-only compile (`u1`).
    pub second_unroll: usize,
    /// The second compile, seconds.
    pub second_compile_seconds: f64,
    /// Size of the second program's `HloModuleProto`.
    pub second_hlo_bytes: usize,
    /// The second program's fit verdict (a program refused for memory has no cost analysis).
    pub second_verdict: String,
    /// The second program's cost analysis.
    pub second_cost: Option<LoopCost>,
    /// The step's estimated cost: FLOPs, bytes, transcendentals, optimal seconds (per chip).
    pub cost: Option<LoopCost>,
    /// `batch · seq_len / optimal_seconds`, the whole slice.
    pub tokens_per_second: Option<f64>,
    /// `tokens_per_second` per chip of the mesh.
    pub tokens_per_second_per_chip: Option<f64>,
    /// How the figures were obtained, in words.
    pub method: String,
}

impl ScanEstimate {
    /// The estimate from the program's own report (`u0` periods per trip) and the report of the
    /// same step compiled with `u1` periods per trip; `tokens` per step over `chips` chips.
    pub fn new(
        periods: usize,
        (u0, u1): (usize, usize),
        base: &ProgramReport,
        second: &ProgramReport,
        tokens: usize,
        chips: usize,
    ) -> ScanEstimate {
        let c0 = base.cost.as_ref().map(LoopCost::from);
        let c1 = second.cost.as_ref().map(LoopCost::from);
        let cost = match (c0, c1) {
            (Some(a), Some(b)) => {
                let f = |x: Option<f64>, y: Option<f64>| Some(extrapolate(x?, y?, periods, u0, u1));
                Some(LoopCost {
                    flops: f(a.flops, b.flops),
                    bytes_accessed: f(a.bytes_accessed, b.bytes_accessed),
                    transcendentals: f(a.transcendentals, b.transcendentals),
                    optimal_seconds: f(a.optimal_seconds, b.optimal_seconds).filter(|&s| s > 0.0),
                })
            }
            _ => None,
        };
        let opt = cost.and_then(|c| c.optimal_seconds);
        ScanEstimate {
            periods,
            unroll: u0,
            second_unroll: u1,
            second_compile_seconds: second.compile_seconds,
            second_hlo_bytes: second.hlo_bytes,
            second_verdict: second.verdict.clone(),
            second_cost: c1,
            cost,
            tokens_per_second: opt.map(|s| tokens as f64 / s),
            tokens_per_second_per_chip: opt.map(|s| tokens as f64 / s / chips as f64),
            method: format!(
                "XLA's cost analysis counts the layer loop's body once: the step compiled with {u0} \
                 period(s) per trip (c0) and again, for its cost only, with {u1} (c1); each figure \
                 = c0 + ({periods} - {u0}) / ({u1} - {u0}) · (c1 - c0) for the {periods} periods{}",
                if c1.is_none() {
                    format!(
                        "; not available: the second program has no cost analysis ({})",
                        second.verdict
                    )
                } else {
                    String::new()
                }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_unrolls_and_the_formula() {
        assert_eq!(second_unroll(14, 1), Some(2));
        assert_eq!(second_unroll(10, 1), Some(2));
        assert_eq!(second_unroll(9, 1), Some(3));
        assert_eq!(second_unroll(7, 1), None);
        assert_eq!(second_unroll(14, 2), None);
        assert_eq!(second_unroll(12, 2), Some(4));
        assert_eq!(second_unroll(1, 1), None);
        assert_eq!(second_unroll(4, 4), None);
        // outside 5, period 3: c(u) = 5 + 3u; 14 periods cost 47.
        let c = |u: usize| 5.0 + 3.0 * u as f64;
        assert_eq!(extrapolate(c(1), c(2), 14, 1, 2), 47.0);
        assert_eq!(extrapolate(c(2), c(6), 14, 2, 6), 47.0);
        assert_eq!(extrapolate(c(1), c(7), 7, 1, 7), c(7));
    }
}
