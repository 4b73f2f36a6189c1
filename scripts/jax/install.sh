#!/usr/bin/env bash
# Installs the JAX (CPU) baseline of issue 13 into a virtual environment under the worktree:
# scripts/jax/.venv (gitignored). CI never runs this. Usage: bash scripts/jax/install.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet \
  jax==0.10.2 jaxlib==0.10.2 safetensors==0.8.0 numpy==2.4.6
"$venv/bin/python" -c 'import jax, safetensors; print("jax", jax.__version__, jax.devices())'
