#!/usr/bin/env bash
# Where XLA CPU spends the train step's compile (issue 13): HLO passes, MLIR fusion emission and
# LLVM codegen, from XLA's own scoped timers (absl vmodule logging, cheap), plus the distinct
# kernels it emitted and reused. Arguments go to the compile_breakdown example, e.g.
#   bash scripts/compile_phases.sh                                        # configs/bench.toml
#   bash scripts/compile_phases.sh --xla xla_backend_optimization_level=3 # XLA's default LLVM level
#   bash scripts/compile_phases.sh --set 'model.layer_pattern=["global"]'
# Needs a release build of the example (cargo build --release -p trainer --example compile_breakdown).
set -euo pipefail
cd "$(dirname "$0")/.."
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=cpu_compiler=1,fusion_compiler=1,ir_compiler=1,thunk_emitter=1 \
  target/release/examples/compile_breakdown "$@" 2>"$log"
python3 - "$log" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
start = max(i for i, l in enumerate(lines) if "Compiling: train_step" in l)
def secs(l):
    m = re.search(r"time: ([0-9.]+) (s|ms|us) ", l)
    return float(m.group(1)) * {"s": 1, "ms": 1e-3, "us": 1e-6}[m.group(2)]
def stamp(l):
    m = re.match(r"\S+ \S+?(\d+\.\d+)\s", l)
    return float(m.group(1))
passes = [l for l in lines if "Running HLO passes on [train_step]" in l][-1]
backend = [l for l in lines if "Compiling [train_step] for CPU using JIT" in l][-1]
rest = lines[start:]
mlir = [l for l in rest if "Compiled MLIR module" in l]
llvm = [l for l in rest if "Compiled LLVM module" in l]
reused = sum(1 for l in rest if "Reusing kernel" in l)
print(f"HLO passes {secs(passes):.2f} s | backend (kernel emission + LLVM) {secs(backend):.2f} s wall")
if mlir:
    print(f"  MLIR fusion emission: {len(mlir)} kernel modules, {stamp(mlir[-1]) - stamp(rest[0]):.2f} s wall, "
          f"{sum(map(secs, mlir)):.2f} s summed over threads")
if llvm:
    print(f"  LLVM codegen: {len(llvm)} modules, {stamp(llvm[-1]) - stamp(llvm[0]):.2f} s wall, "
          f"{sum(map(secs, llvm)):.2f} s summed over threads")
print(f"  fusions that reused an emitted kernel: {reused}")
PY
