#!/usr/bin/env python3
"""Numerics check: the JAX model against `rattn train`, on the same checkpoint and batch.

For every case (RAttention with a global layer, SWA, full attention without and with RoPE
(`model.global_rope`), RAttention with RoPE on its global layer, and RAttention with qk-norm,
untied head, GeGLU and the relu feature map) this

1. writes a random little-endian u16 token file and trains `rattn train` for 4 steps on it
   (`data.kind = "tokens"`), logging and checkpointing every step;
2. loads `ckpt_00000003.safetensors` (parameters, Adam moments, data position) into the JAX model,
   cuts the same batch from the token file (data.rs's window hash, ported), and runs one JAX train
   step (jit(value_and_grad) + AdamW with rattn's formulas) at step 3;
3. compares the loss and the gradient norm with what `rattn` logged for step 4 (metrics.jsonl),
   and the updated parameters with `ckpt_00000004.safetensors`; the loss is also computed in f64
   (JAX with x64) as the exact value both f32 programs round, and in f32 with the other forms
   (RLA as a lax.scan, SWA in W-query blocks).

Usage (from the repository root, after `bash scripts/jax/install.sh`):

    scripts/jax/.venv/bin/python scripts/jax/check.py [--rattn target/release/rattn] [--case NAME]

Exit status 0 when every case is within tolerance (loss 1e-6 relative, grad norm 1e-4, parameter
update 1e-3 relative to the update's size), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rattn_jax import Config, load_checkpoint, loss_fn, make_train_step, stream_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# Small shapes that still have several RLA chunks, a window shorter than the sequence, GQA and a
# 3:1 stack with a global layer.
BASE = [
    "model.layers=4",
    'model.layer_pattern="3:1"',
    "model.seq_len=96",
    "model.window=12",
    "model.rla.chunk=32",
    "model.rla.sub_chunk=8",
    "train.batch=2",
    "train.steps=4",
    "train.warmup=1",
    "train.lr=1e-2",
    "train.log_every=1",
    "train.checkpoint_every=1",
    "train.keep_checkpoints=2",
]
CASES = {
    "rattention": [],
    "swa": ['model.local_kind="swa"'],
    "full": ['model.layer_pattern=["global"]'],
    "full-rope": ['model.layer_pattern=["global"]', "model.global_rope=true"],
    "rattention-global-rope-qknorm": ["model.global_rope=true", "model.qk_norm=true"],
    "rattention-qknorm-untied-geglu-relu": [
        "model.qk_norm=true",
        "model.tied_embeddings=false",
        'model.ffn_activation="geglu"',
        'model.rla.feature_map="relu"',
    ],
    "rattention-rla-norm-off": ["model.rla.norm=false"],
}
TOL = {"loss": 1e-6, "alt_loss": 1e-6, "grad_norm": 1e-4, "update": 1e-3}


def rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-30)


def run_case(name, rattn, config, extra, work: Path):
    overrides = BASE + extra
    cfg0 = Config.load(config, overrides)
    rng = np.random.default_rng(1234)
    b, t, vocab = cfg0.train["batch"], cfg0.model["seq_len"], cfg0.model["vocab"]
    tokens = rng.integers(0, vocab, size=b * (t + 1) * 5 + 7, dtype=np.uint16)
    tok_path = work / f"{name}.u16"
    tok_path.write_bytes(tokens.astype("<u2").tobytes())
    overrides += ['data.kind="tokens"', f'data.path="{tok_path}"', "data.token_bits=16"]
    out = work / name
    cmd = [rattn, "train", "--config", str(config), "--out", str(out), "--quiet", "--eval-sequences", "0"]
    for o in overrides:
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    metrics = {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().split("\n")[:-1])}
    cfg = Config.load(config, overrides)
    last = cfg.train["steps"]
    p1, m1, v1, meta = load_checkpoint(out / f"ckpt_{last - 1:08}.safetensors", cfg)
    p2, _, _, _ = load_checkpoint(out / f"ckpt_{last:08}.safetensors", cfg)
    step = int(meta["step"])
    # rattn trains on the head of the stream; the last data.eval_fraction (rounded up) is held out.
    frac = float(cfg.data.get("eval_fraction", 0.05))
    head = len(tokens) - int(np.ceil(len(tokens) * frac))
    toks, weights = stream_batch(tokens[:head].astype(np.int64), int(meta["data_position"]), b, t)

    # The exact loss of the checkpoint's parameters (f64) and the f32 train step.
    f64 = {k: jnp.asarray(v, jnp.float64) for k, v in p1.items()}
    loss64 = float(loss_fn(f64, jnp.asarray(toks), jnp.asarray(weights, jnp.float64), cfg))
    f32 = lambda d: {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}  # noqa: E731
    train_step = make_train_step(cfg)
    np_, _, _, loss, gnorm, lr = train_step(
        f32(p1), f32(m1), f32(v1), jnp.float32(step), jnp.asarray(toks), jnp.asarray(weights)
    )
    alt = jax.jit(lambda p, t, w: loss_fn(p, t, w, cfg, rla_impl="scan", swa_impl="blocked"))(
        f32(p1), jnp.asarray(toks), jnp.asarray(weights)
    )
    ref = metrics[step + 1]
    num = sum(float(np.sum((np.asarray(np_[k], np.float64) - p2[k]) ** 2)) for k in p2)
    den = sum(float(np.sum((p2[k].astype(np.float64) - p1[k]) ** 2)) for k in p2)
    worst = max(p2, key=lambda k: float(np.max(np.abs(np.asarray(np_[k]) - p2[k]))))
    res = {
        "case": name,
        "rattn_loss": ref["loss"],
        "jax_loss": float(loss),
        "f64_loss": loss64,
        "loss": rel(loss, ref["loss"]),
        "rattn_vs_f64": rel(ref["loss"], loss64),
        "jax_vs_f64": rel(loss, loss64),
        "alt_loss": rel(alt, ref["loss"]),
        "grad_norm": rel(gnorm, ref["grad_norm"]),
        "lr": rel(lr, ref["lr"]),
        "update": (num / max(den, 1e-30)) ** 0.5,
        "worst_param": worst,
        "worst_param_abs": float(np.max(np.abs(np.asarray(np_[worst]) - p2[worst]))),
    }
    res["ok"] = all(res[k] <= TOL[k] for k in TOL)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rattn", default=os.environ.get("RATTN", str(ROOT / "target/release/rattn")))
    ap.add_argument("--config", default=str(ROOT / "configs/tiny.toml"))
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="run only these cases")
    ap.add_argument("--keep", help="keep the runs in this directory")
    args = ap.parse_args()
    if not Path(args.rattn).exists():
        sys.exit(f"no rattn binary at {args.rattn}: cargo build --release -p trainer, or pass --rattn")
    print(f"jax {jax.__version__}, rattn {args.rattn}, config {args.config} + {' '.join(BASE)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = [run_case(c, args.rattn, args.config, CASES[c], work) for c in (args.case or CASES)]
    hdr = f"{'case':38} {'rattn loss':>12} {'jax loss':>12} {'rel':>9} {'rattn-f64':>9} {'jax-f64':>9} {'alt rel':>9} {'gnorm rel':>9} {'update':>9}"
    print(hdr)
    for r in results:
        print(
            f"{r['case']:38} {r['rattn_loss']:12.9f} {r['jax_loss']:12.9f} {r['loss']:9.2e} "
            f"{r['rattn_vs_f64']:9.2e} {r['jax_vs_f64']:9.2e} {r['alt_loss']:9.2e} {r['grad_norm']:9.2e} {r['update']:9.2e}"
            f"  {'ok' if r['ok'] else 'FAIL'}  (largest parameter difference {r['worst_param_abs']:.2e} in {r['worst_param']})"
        )
    print("alt = the JAX loss with RLA as a lax.scan and SWA in W-query blocks (the step uses the "
          "parallel RLA and masked T×T SWA)")
    print(f"tolerances: loss {TOL['loss']:.0e} relative (alt too), grad norm {TOL['grad_norm']:.0e}, "
          f"update ||p_jax - p_rattn|| / ||p_rattn - p_before|| {TOL['update']:.0e}")
    failed = [r["case"] for r in results if not r["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
