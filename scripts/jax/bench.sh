#!/usr/bin/env bash
# Side-by-side train-step benchmark: `rattn train` against the JAX model (issue 13), alternating
# runs, ratio table with the load average. Arguments go to scripts/jax/bench.py, e.g.
#   bash scripts/jax/bench.sh                        # configs/bench.toml, T=1024/4096, 3 kinds, 2 rounds
#   bash scripts/jax/bench.sh --quick                # small shapes: checks that it runs
#   bash scripts/jax/bench.sh configs/bench.toml --shapes T4096 --kinds rattention full --rounds 3
# Needs `bash scripts/jax/install.sh` and a release rattn (target/release/rattn, or RATTN=path).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${RATTN_JAX_PYTHON:-$here/.venv/bin/python}"
if ! "$py" -c 'import jax' 2>/dev/null; then
  echo "no python with jax at $py: run bash scripts/jax/install.sh (or set RATTN_JAX_PYTHON)" >&2
  exit 2
fi
cd "$here/../.."
exec "$py" "$here/bench.py" --python "$py" "$@"
