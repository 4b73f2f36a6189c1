#!/bin/bash
# Compile and step CPU time of the train step with attention as our CPU kernels against the
# blocked HLO (model.attention_lowering), configs/bench.toml at T 1024 and T 4096 (B 1, W 512),
# RAttention 3:1 and full attention. Needs: cargo build --release -p trainer --example compile_breakdown
set -e
cd "$(dirname "$0")/.."
CB=./target/release/examples/compile_breakdown
run() { # label, args...
  local label=$1; shift
  for L in kernel hlo; do
    echo "== $label lowering=$L $(uptime | sed 's/.*load/load/')"
    $CB --config configs/bench.toml --repeat 2 --steps 6 "$@" --set "model.attention_lowering=\"$L\"" 2>&1 | grep -E "^round|^step"
  done
}
run "T1024 rattention(3:1)"
run "T1024 full" --set 'model.layer_pattern=["global"]'
run "T4096 B1 W512 rattention(3:1)" --set model.seq_len=4096 --set train.batch=1 --set model.window=512
run "T4096 B1 W512 full" --set model.seq_len=4096 --set train.batch=1 --set model.window=512 --set 'model.layer_pattern=["global"]'
