#!/usr/bin/env python3
"""Time the JAX train step of a `rattn` config: jit compile (trace + lower + compile) and
tokens/s over `--steps` steps after one warm-up step. Prints one JSON line.

    scripts/jax/.venv/bin/python scripts/jax/bench_jax.py --config configs/bench.toml \
        --set model.seq_len=4096 --set train.batch=1 --set model.window=512 --steps 25
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rattn_jax import Config, init_params, make_train_step  # noqa: E402


def cpu_s():
    """User + system CPU seconds of this process, all threads (exited ones included)."""
    t = os.times()
    return t.user + t.system


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/bench.toml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default train.steps)")
    ap.add_argument("--rla", default="parallel", choices=["parallel", "scan"], help="RLA form")
    ap.add_argument("--rla-chunk", type=int, default=None, help="RLA chunk (default rla.sub_chunk)")
    ap.add_argument("--swa", default="masked", choices=["masked", "blocked"], help="SWA form")
    args = ap.parse_args()
    cfg = Config.load(args.config, args.overrides)
    b, t = cfg.train["batch"], cfg.model["seq_len"]
    steps = args.steps or cfg.train["steps"]
    params = init_params(cfg, cfg.train["seed"])
    adam_m = {k: jnp.zeros_like(v) for k, v in params.items()}
    adam_v = {k: jnp.zeros_like(v) for k, v in params.items()}
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.model["vocab"], size=(b, t + 1)), jnp.int32)
    weights = jnp.ones((b, t), jnp.float32)
    step_fn = make_train_step(cfg, rla_impl=args.rla, rla_chunk=args.rla_chunk, swa_impl=args.swa)
    t0, c0 = time.perf_counter(), cpu_s()
    compiled = step_fn.lower(params, adam_m, adam_v, jnp.float32(0), tokens, weights).compile()
    compile_s = time.perf_counter() - t0
    compile_cpu_s = cpu_s() - c0
    t0 = time.perf_counter()
    params, adam_m, adam_v, loss, _, _ = compiled(params, adam_m, adam_v, jnp.float32(0), tokens, weights)
    first = float(loss)
    first_step_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(1, steps):
        params, adam_m, adam_v, loss, _, _ = compiled(
            params, adam_m, adam_v, jnp.float32(i), tokens, weights
        )
        last = float(loss)  # read the loss every step, as rattn does
    dt = time.perf_counter() - t0
    timed = max(steps - 1, 1)
    out = {
        "jax": jax.__version__,
        "compile_s": compile_s,
        "compile_cpu_s": compile_cpu_s,
        "first_step_s": first_step_s,
        "step_s": dt / timed,
        "tokens_per_s": b * t * timed / dt if steps > 1 else b * t / first_step_s,
        "loss_first": first,
        "loss_last": last if steps > 1 else first,
        "rla": args.rla,
        "swa": args.swa,
        "rla_chunk": args.rla_chunk or cfg.model["rla"]["sub_chunk"],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
