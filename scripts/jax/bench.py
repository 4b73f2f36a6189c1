#!/usr/bin/env python3
"""Side-by-side train-step benchmark of issue 13: `rattn train` against the same model in JAX on
XLA CPU (scripts/jax/rattn_jax.py), alternating runs in one invocation, with a ratio table.

For every shape (T = 1024, B = 4, W = 64 and T = 4096, B = 1, W = 512 by default) and attention
kind (RAttention, SWA, full attention), each round runs `rattn train` and then the JAX step (the
order flips every round), each in a fresh process:

* rattn: tokens/s from metrics.jsonl, averaged over the logged windows after the first (the first
  window holds the first step); compile = `compile_s` (trace + autodiff + XLA compile);
* JAX: tokens/s over the steps after a warm-up step; compile = jit lower + compile (trace
  included), timed in a fresh process (bench_jax.py);
* both: the compile's CPU seconds (user + system, all threads: `compile_cpu_s`), which other jobs
  on the machine disturb less than the wall time. `XLA_FLAGS` reaches both sides (rattn's CPU
  default `xla_backend_optimization_level=1` steps aside when `XLA_FLAGS` sets the level).

Prints the 1-minute load average before and after every run; numbers taken at a load above the
machine's core count say little.

    bash scripts/jax/bench.sh                       # the issue's shapes, 2 rounds
    bash scripts/jax/bench.sh --quick               # small shapes: checks the script runs
    bash scripts/jax/bench.sh configs/bench.toml --shapes T1024 --kinds rattention --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

SHAPES = {
    "T1024": ["model.seq_len=1024", "train.batch=4", "model.window=64"],
    "T4096": ["model.seq_len=4096", "train.batch=1", "model.window=512"],
    "quick": ["model.seq_len=128", "train.batch=2", "model.window=16"],
}
KINDS = {
    "rattention": ['model.local_kind="rattention"'],
    "swa": ['model.local_kind="swa"'],
    "full": ['model.layer_pattern=["global"]'],
}


def load():
    return os.getloadavg()[0]


def run_rattn(rattn, config, sets, steps, log_every):
    with tempfile.TemporaryDirectory() as out:
        cmd = [rattn, "train", "--config", config, "--out", out, "--quiet", "--eval-sequences", "0"]
        for s in sets + [
            f"train.steps={steps}",
            f"train.log_every={log_every}",
            "train.checkpoint_every=0",
            "train.keep_checkpoints=1",
        ]:
            cmd += ["--set", s]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        lines = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    tps = [x["tokens_per_s"] for x in lines]
    steady = tps[1:] if len(tps) > 1 else tps
    return {"tokens_per_s": statistics.fmean(steady), "compile_s": lines[0]["compile_s"],
            "compile_cpu_s": lines[0].get("compile_cpu_s", float("nan"))}


def run_jax(python, config, sets, steps, rla, rla_chunk, swa):
    cmd = [python, str(HERE / "bench_jax.py"), "--config", config, "--steps", str(steps), "--rla", rla,
           "--swa", swa]
    if rla_chunk:
        cmd += ["--rla-chunk", str(rla_chunk)]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def span(xs, fmt="{:,.0f}"):
    lo, hi = min(xs), max(xs)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default=str(ROOT / "configs/bench.toml"))
    ap.add_argument("--rattn", default=os.environ.get("RATTN", str(ROOT / "target/release/rattn")))
    ap.add_argument("--python", default=sys.executable, help="python with jax (default: this one)")
    ap.add_argument("--shapes", nargs="+", default=["T1024", "T4096"], choices=sorted(SHAPES))
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25, help="steps per rattn run and per JAX run")
    ap.add_argument("--log-every", type=int, default=5, help="rattn's tokens/s window")
    ap.add_argument("--rla", default="parallel", choices=["parallel", "scan"], help="JAX RLA form")
    ap.add_argument("--rla-chunk", type=int, default=None, help="JAX RLA chunk (default rla.sub_chunk)")
    ap.add_argument("--swa", default="masked", choices=["masked", "blocked"],
                    help="JAX SWA form: the whole T×T scores with a band mask, or W-query blocks")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra overrides given to both")
    ap.add_argument("--quick", action="store_true", help="T=128 B=2 W=16, 4 steps, 1 round")
    ap.add_argument("--json", help="also write the raw results here")
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.rounds, args.steps, args.log_every = ["quick"], 1, 4, 1
    if not Path(args.rattn).exists():
        sys.exit(f"no rattn binary at {args.rattn}: cargo build --release -p trainer, or pass --rattn")
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  {os.cpu_count()} CPUs  config {args.config}")
    print(f"# rattn {args.rattn}; JAX RLA {args.rla}, SWA {args.swa}; {args.steps} steps a run, {args.rounds} rounds")
    rows = []
    for shape in args.shapes:
        for kind in args.kinds:
            sets = SHAPES[shape] + KINDS[kind] + args.overrides
            res = {"shape": shape, "kind": kind, "rattn": [], "jax": [], "load": []}
            for rnd in range(args.rounds):
                order = ["rattn", "jax"] if rnd % 2 == 0 else ["jax", "rattn"]
                for who in order:
                    l0 = load()
                    if who == "rattn":
                        r = run_rattn(args.rattn, args.config, sets, args.steps, args.log_every)
                    else:
                        r = run_jax(args.python, args.config, sets, args.steps, args.rla, args.rla_chunk, args.swa)
                    l1 = load()
                    res[who].append(r)
                    res["load"] += [l0, l1]
                    print(f"  {shape} {kind:10} round {rnd} {who:5}: {r['tokens_per_s']:9.1f} tok/s, "
                          f"compile {r['compile_s']:6.2f} s (CPU {r.get('compile_cpu_s', float('nan')):5.2f} s), "
                          f"load {l0:.1f} → {l1:.1f}", flush=True)
            rows.append(res)
    print()
    print("| shape | attention | rattn tok/s | JAX tok/s | ratio | rattn trace+compile s | JAX jit compile s | compile ratio "
          "| rattn compile CPU s | JAX compile CPU s | CPU ratio | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a = [x["tokens_per_s"] for x in r["rattn"]]
        j = [x["tokens_per_s"] for x in r["jax"]]
        ca = [x["compile_s"] for x in r["rattn"]]
        cj = [x["compile_s"] for x in r["jax"]]
        ratio = statistics.median(a) / statistics.median(j)
        cratio = statistics.median(ca) / statistics.median(cj)
        pa = [x.get("compile_cpu_s", float("nan")) for x in r["rattn"]]
        pj = [x.get("compile_cpu_s", float("nan")) for x in r["jax"]]
        pratio = statistics.median(pa) / statistics.median(pj)
        print(f"| {r['shape']} | {r['kind']} | {span(a)} | {span(j)} | {ratio:.2f}× | "
              f"{span(ca, '{:.2f}')} | {span(cj, '{:.2f}')} | {cratio:.2f} | "
              f"{span(pa, '{:.2f}')} | {span(pj, '{:.2f}')} | {pratio:.2f} | {span(r['load'], '{:.1f}')} |")
    print("\nratio = median rattn tok/s / median JAX tok/s (> 1: rattn faster); "
          "compile ratio = rattn / JAX (< 1: rattn compiles faster); compile CPU s = user + system "
          "seconds of all threads during trace + compile (less sensitive to load than wall time)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
