#!/bin/bash
# The GPU check of README's "RLA blocks on a GPU" section, in two halves:
#   scripts/gpu-check.sh prepare   here (any x86-64 machine with the CPU plugin): builds rattn,
#                                  strips a copy into .gpu/, runs the 20-step CPU reference run
#   scripts/gpu-check.sh run       on the GPU machine (needs jax-cuda13-pjrt's plugin and the
#                                  CUDA wheels in python3's site-packages; $OUT: where logs go)
# Environment for `run`: CHECK_T (sequence lengths, default "4096 1024"), CHECK_LOWERINGS
# (comma-separated, default "hlo,triton"), CHECK_TRAIN_LOWERING (the 20-step train's RLA
# lowering, default triton; the CPU reference uses the custom call).
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  set -e
  cargo build --release -p trainer
  mkdir -p .gpu
  cp target/release/rattn .gpu/rattn && strip .gpu/rattn
  cp configs/tiny.toml .gpu/tiny.toml
  rm -rf .gpu/cpu20
  .gpu/rattn train --config .gpu/tiny.toml --set train.steps=20 --set train.log_every=1 \
    --eval-sequences 0 --quiet --out .gpu/cpu20 >/dev/null
  cp .gpu/cpu20/metrics.jsonl .gpu/cpu_metrics.jsonl && rm -rf .gpu/cpu20
  echo "ready: carry .gpu to the GPU machine and run scripts/gpu-check.sh run"
  ;;
run)
  OUT=${OUT:-/tmp/gpu-check}
  mkdir -p "$OUT"
  exec > >(tee "$OUT/check.log") 2>&1
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  SITE=$(python3 -c "import site; print(site.getsitepackages()[0])")
  python3 -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|triton)" | head
  P=$(find "$SITE" -name xla_cuda_plugin.so 2>/dev/null | head -1)
  echo "plugin: $P"
  # The CUDA libraries of the nvidia wheels (jax preloads them from Python; we are no Python).
  LIBS=$(find "$SITE/nvidia" -maxdepth 3 -type d -name lib 2>/dev/null | tr '\n' ':')
  export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
  export RATTN_CACHE=/tmp/rattn-cache
  R=.gpu/rattn
  timeout 60 $R doctor --plugin "$P"
  # The benchmark shape (B1 N8 G2 H128 W512 chunk 512) at each T in CHECK_T (default "4096 1024";
  # CHECK_T="" skips it).
  for T in ${CHECK_T-4096 1024}; do
    timeout 200 $R bench rla --plugin "$P" --seq "$T" --reps 10 \
      --lowering "${CHECK_LOWERINGS:-hlo,triton}" --json "$OUT/bench_rla_T$T.json"
  done
  # A matrix of small cases, one factor at a time away from a softmax B1 G1 H16 base:
  # name B T N G H W sub-chunk chunk feature-map
  while read -r name b t n g h w c l fm; do
    echo "== case $name: B$b T$t N$n G$g H$h W$w sub-chunk $c chunk $l $fm"
    timeout 120 $R bench rla --plugin "$P" --batch "$b" --seq "$t" --heads "$n" --kv-heads "$g" \
      --head-dim "$h" --window "$w" --sub-chunk "$c" --chunk "$l" --feature-map "$fm" --reps 3 \
      --lowering "${CHECK_LOWERINGS:-hlo,triton}" 2>&1 | grep -vE "^(RLA blocks|reference|lowering )"
  done <<'CASES'
base     1 256  4 1 16 32  16 64  softmax
relu     1 256  4 1 16 32  16 64  relu
g2       1 256  4 2 16 32  16 64  softmax
b2       2 256  4 1 16 32  16 64  softmax
h32      1 256  4 1 32 32  16 64  softmax
h64      1 256  4 1 64 32  32 64  softmax
tiny     8 256  4 2 16 32  16 64  softmax
long64r  1 1000 4 1 64 100 32 128 relu
long64s  1 1000 4 1 64 100 32 128 softmax
CASES
  rm -rf /tmp/g20
  timeout 150 $R train --plugin "$P" --config .gpu/tiny.toml --set train.steps=20 \
    --set train.log_every=1 --set "model.rla.lowering=\"${CHECK_TRAIN_LOWERING:-triton}\"" \
    --eval-sequences 0 --quiet --out /tmp/g20
  cp /tmp/g20/metrics.jsonl "$OUT/gpu_metrics.jsonl" 2>/dev/null
  python3 - <<'PY'
import json
def load(p):
    return {r["step"]: r["loss"] for r in map(json.loads, open(p))}
c, g = load(".gpu/cpu_metrics.jsonl"), load("/tmp/g20/metrics.jsonl")
worst = max(abs(g[s] - c[s]) / abs(c[s]) for s in c)
for s in sorted(c):
    print(f"step {s:3d} cpu {c[s]:.6f} gpu {g[s]:.6f}")
print(f"tiny train, 20 steps: max relative loss difference GPU vs CPU {worst:.2e}")
PY
  date -u
  ;;
*)
  echo "usage: scripts/gpu-check.sh prepare|run" >&2
  exit 2
  ;;
esac
