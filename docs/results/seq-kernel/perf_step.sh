#!/bin/bash
# Sample the steady-state train step with `perf` (user and kernel, 499 Hz, recording from 20 s
# on, after the compile) for each mesh given, then print CPU ms per step by where the time goes
# (perf_cats.py). Model: configs/bench.toml at T 256, B 8, W 64, chunk 32 (the sharded_step
# bench's shapes; env T and B change the sequence length and the batch). Run from the repository
# root on a quiet machine:
#   bash docs/results/seq-kernel/perf_step.sh mesh.data=1 mesh.data=8 mesh.seq=8
# Needs perf (linux-perf) and a release build (cargo build --release -p trainer).
set -euo pipefail
out=${PERF_OUT:-/tmp/perf_step}
t=${T:-256}
b=${B:-8}
mkdir -p "$out"
names=()
for m in "$@"; do
  n=$(echo "$m" | tr -dc 'a-z0-9')
  names+=("$n")
  rm -rf "$out/run_$n"
  start=$(date +%s.%N)
  perf record -q -D 20000 -F 499 -o "$out/$n.data" -- ./target/release/rattn train \
    --config configs/bench.toml --set model.seq_len="$t" --set train.batch="$b" \
    --set model.window=64 --set model.rla.chunk=32 --set model.rla.sub_chunk=16 \
    --set "$m" --set train.steps=250 --eval-sequences 0 --quiet --out "$out/run_$n" > /dev/null 2>&1
  end=$(date +%s.%N)
  echo "$end - $start" | bc > "$out/$n.elapsed"
done
python3 "$(dirname "$0")/perf_cats.py" "$out" "${names[@]}"
