#!/usr/bin/env python3
"""The JAX side of `cargo run --release -p trainer --example compile_breakdown` (issue 13's compile
target): wall and CPU seconds (user + system, all threads) of the train step's jit lower (trace)
and XLA compile, and the optimized program's size (instructions, fusion calls, dots).

    scripts/jax/.venv/bin/python scripts/jax/compile_breakdown.py [--kind rattention|swa|full] \
        [--set KEY=VALUE] [--swa blocked] [--dump optimized.txt]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from rattn_jax import Config, init_params, make_train_step  # noqa: E402

KINDS = {
    "rattention": ['model.local_kind="rattention"'],
    "swa": ['model.local_kind="swa"'],
    "full": ['model.layer_pattern=["global"]'],
}


def cpu_s():
    t = os.times()
    return t.user + t.system


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(HERE.parent.parent / "configs/bench.toml"))
    ap.add_argument("--kind", default="rattention", choices=list(KINDS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--swa", default="blocked", choices=["masked", "blocked"])
    ap.add_argument("--rla", default="parallel", choices=["parallel", "scan"])
    ap.add_argument("--dump", help="write the optimized HLO text here")
    args = ap.parse_args()
    cfg = Config.load(args.config, KINDS[args.kind] + args.overrides)
    b, t = cfg.train["batch"], cfg.model["seq_len"]
    params = init_params(cfg, cfg.train["seed"])
    m = {k: jnp.zeros_like(v) for k, v in params.items()}
    v = {k: jnp.zeros_like(x) for k, x in params.items()}
    tokens = jnp.zeros((b, t + 1), jnp.int32)
    w = jnp.ones((b, t), jnp.float32)
    fn = make_train_step(cfg, rla_impl=args.rla, rla_chunk=None, swa_impl=args.swa)
    w0, c0 = time.perf_counter(), cpu_s()
    low = fn.lower(params, m, v, jnp.float32(0), tokens, w)
    w1, c1 = time.perf_counter(), cpu_s()
    comp = low.compile()
    w2, c2 = time.perf_counter(), cpu_s()
    txt = comp.as_text()
    if args.dump:
        Path(args.dump).write_text(txt)
    instr = sum(1 for line in txt.splitlines() if re.match(r"\s+(ROOT )?%\S+ = ", line))
    print(
        f"JAX {jax.__version__} {args.kind}: lower {w1 - w0:.3f} s (cpu {c1 - c0:.2f}), "
        f"compile {w2 - w1:.3f} s (cpu {c2 - c1:.2f}); total {w2 - w0:.3f} s (cpu {c2 - c0:.2f}) | "
        f"optimized: {instr} instructions, fusion calls {len(re.findall(r' fusion[(]', txt))}, "
        f"dots {len(re.findall(r' dot[(]', txt))}, load {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
