#!/bin/bash
# Compile and step CPU time of the train step with the loss, the RMS norms and the token embedding
# as our CPU kernels (model.loss_lowering / norm_lowering / embed_lowering = "kernel", the default
# on one CPU device) against their HLO lowerings, configs/bench.toml at T 1024, full attention and RAttention 3:1, alternated
# in one run, with JAX's jit compile of the same model between them (when scripts/jax/.venv
# exists). ROUNDS (default 2) alternations. Needs:
#   cargo build --release -p trainer --example compile_breakdown
set -e
cd "$(dirname "$0")/.."
CB=./target/release/examples/compile_breakdown
PY=scripts/jax/.venv/bin/python
load() { uptime | sed 's/.*load average: //'; }
ours() { # label, lowering, args...
  local label=$1 l=$2; shift 2
  echo "== $label loss+norm+embed=$l (load $(load))"
  $CB --config configs/bench.toml --repeat 2 --steps 5 "$@" --set "model.loss_lowering=\"$l\"" \
    --set "model.norm_lowering=\"$l\"" --set "model.embed_lowering=\"$l\"" 2>&1 | grep -E "^round|^step"
}
jax() { # kind
  if [ -x "$PY" ]; then
    echo "== JAX $1 (load $(load))"
    "$PY" scripts/jax/compile_breakdown.py --kind "$1" --swa blocked 2>&1 | grep -iE "compile|lower" | head -3
  fi
}
for r in $(seq "${ROUNDS:-2}"); do
  echo "### round $r"
  for L in hlo kernel; do ours "T1024 full" $L --set 'model.layer_pattern=["global"]'; done
  jax full
  for L in hlo kernel; do ours "T1024 rattention(3:1)" $L; done
  jax rattention
done
