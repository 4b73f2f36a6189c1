"""The rattention model written the usual way in JAX (CPU baseline of issue 13).

Reads the same TOML config as `rattn` (with the same `--set key=value` overrides) so shapes and
hyper-parameters match, and follows DESIGN §2 and crates/model/src exactly:

* pre-norm blocks `y = x + Wo·attn(RMSNorm(x))`, `out = y + FFN(RMSNorm(y))`, gated FFN
  (SwiGLU or tanh-GeGLU), final RMSNorm, tied (or untied) LM head;
* local layers: SWA with interleaved RoPE (dims 2i, 2i+1, frequency θ^(−2i/H)), q scaled by
  H^−1/2, optional per-head qk RMSNorm before RoPE, key s visible to query t iff t−W ≤ s ≤ t;
  RAttention adds residual linear attention on the *raw* q, k (no RoPE, no scaling, no qk-norm)
  over the keys s ≤ t−W−1 with φ(x) = [softmax(x), softmax(−x)] (or relu) and no denominator,
  mixed as GroupRMSNorm_swa(o_swa) + GroupRMSNorm_rla(o_rla) (eps 1e-8, per-head scales [N, H]);
* global layers: full causal attention, without RoPE unless `model.global_rope` (then the same
  rotation as local layers, after the optional qk-norm);
* loss: weighted mean next-token cross-entropy `Σ w·nll / max(Σ w, 1)`;
* the train step: jit(value_and_grad) + global-norm clipping + warmup/cosine schedule + AdamW with
  decoupled decay on the embedding and matrices only — the formulas of crates/trainer/src/step.rs.

Attention is einsum over the whole T×T score matrix with a mask (what one writes in JAX; SWA can
also run `blocked`: W queries against 2W keys); RLA is
chunked in plain jnp, either all chunks at once with an exclusive prefix sum of the per-chunk
states (`parallel`) or a `jax.lax.scan` over chunks carrying the state (`scan`).

Parameters are a dict keyed by the names of crates/model/src/params.rs (`layers.0.attn.wq`, …);
checkpoints of `rattn train` load with `load_checkpoint`.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import jax
import jax.numpy as jnp

F32 = jnp.float32

MODEL_DEFAULTS = {
    "ffn_activation": "swiglu",
    "layer_pattern": "3:1",
    "local_kind": "rattention",
    "rope_theta": 5e5,
    "global_rope": False,
    "qk_norm": False,
    "norm_eps": 1e-6,
    "tied_embeddings": True,
    "dtype": "f32",
}
RLA_DEFAULTS = {
    "feature_map": "softmax",
    "chunk": 512,
    "sub_chunk": 64,
    "lowering": "auto",
    "norm": True,
}
TRAIN_DEFAULTS = {
    "batch": 8,
    "steps": 100,
    "lr": 1e-3,
    "warmup": 10,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-8,
    "clip_norm": 1.0,
    "seed": 0,
}


def apply_override(root: dict, override: str) -> None:
    """`key.path=value` with value parsed as TOML, else taken as a string (as `rattn --set`)."""
    key, sep, raw = override.partition("=")
    if not sep:
        raise ValueError(f"override {override!r} is not key=value (e.g. train.steps=50)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    parts = key.strip().split(".")
    cur = root
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value


@dataclass
class Config:
    """The `[model]` and `[train]` tables of a run config, with `rattn`'s defaults filled in."""

    model: dict
    train: dict
    data: dict = field(default_factory=dict)

    @staticmethod
    def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> "Config":
        root = tomllib.loads(Path(path).read_text())
        for o in overrides:
            apply_override(root, o)
        model = {**MODEL_DEFAULTS, **root["model"]}
        model["rla"] = {**RLA_DEFAULTS, **root["model"].get("rla", {})}
        train = {**TRAIN_DEFAULTS, **root.get("train", {})}
        cfg = Config(model, train, root.get("data", {}))
        if model["dtype"] != "f32":
            raise ValueError(f"model.dtype {model['dtype']!r}: the JAX baseline is f32 only")
        if model["heads"] % model["kv_heads"]:
            raise ValueError(
                f"heads ({model['heads']}) must be divisible by kv_heads ({model['kv_heads']})"
            )
        cfg.layer_kinds()
        return cfg

    def layer_kinds(self) -> list[str]:
        """`"global"`, `"rattention"` or `"swa"` for every layer (crates/model config + Model)."""
        m = self.model
        pat = m["layer_pattern"]
        if isinstance(pat, str):
            a, sep, b = pat.partition(":")
            if not sep:
                raise ValueError(f"layer_pattern {pat!r} is not a ratio like \"3:1\" or a list")
            unit = ["local"] * int(a) + ["global"] * int(b)
        else:
            unit = list(pat)
        if not unit:
            raise ValueError(f"layer_pattern {pat!r} has no layers")
        local = m["local_kind"]
        return [local if unit[i % len(unit)] == "local" else "global" for i in range(m["layers"])]


def param_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Name → shape, in the order of crates/model/src/params.rs."""
    m = cfg.model
    d, q, kv, h = m["d_model"], m["heads"] * m["head_dim"], m["kv_heads"] * m["head_dim"], m["head_dim"]
    out = {"embed": (m["vocab"], d)}
    for i, kind in enumerate(cfg.layer_kinds()):
        p = f"layers.{i}"
        out[f"{p}.attn_norm.scale"] = (d,)
        out[f"{p}.attn.wq"] = (d, q)
        out[f"{p}.attn.wk"] = (d, kv)
        out[f"{p}.attn.wv"] = (d, kv)
        out[f"{p}.attn.wo"] = (q, d)
        if m["qk_norm"]:
            out[f"{p}.attn.q_norm.scale"] = (h,)
            out[f"{p}.attn.k_norm.scale"] = (h,)
        if kind == "rattention":
            out[f"{p}.attn.swa_norm.scale"] = (m["heads"], h)
            if m["rla"]["norm"]:
                out[f"{p}.attn.rla_norm.scale"] = (m["heads"], h)
        out[f"{p}.ffn_norm.scale"] = (d,)
        out[f"{p}.ffn.w_gate"] = (d, m["ffn_dim"])
        out[f"{p}.ffn.w_up"] = (d, m["ffn_dim"])
        out[f"{p}.ffn.w_down"] = (m["ffn_dim"], d)
    out["final_norm.scale"] = (d,)
    if not m["tied_embeddings"]:
        out["lm_head"] = (d, m["vocab"])
    return out


def decays(name: str) -> bool:
    """Weight decay on the embedding and matrices, not on norm scales (step.rs `decays`)."""
    return not name.endswith(".scale")


def init_params(cfg: Config, seed: int = 0) -> dict[str, jax.Array]:
    """Normal(0.02) matrices, wo / w_down scaled by 1/sqrt(2·layers), unit norm scales (the
    distributions of params.rs; the random numbers are JAX's, not rattn's)."""
    key = jax.random.PRNGKey(seed)
    std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.model["layers"])
    params = {}
    for name, shape in param_shapes(cfg).items():
        key, sub = jax.random.split(key)
        if name.endswith(".scale"):
            params[name] = jnp.ones(shape, F32)
        else:
            s = out_std if name.endswith((".wo", ".w_down")) else std
            params[name] = s * jax.random.normal(sub, shape, F32)
    return params


def load_checkpoint(path: str | Path, cfg: Config | None = None):
    """(params, adam_m, adam_v, metadata) of a `rattn train` checkpoint, as numpy f32 dicts keyed
    by parameter name; with `cfg`, every parameter is checked for presence and shape."""
    from safetensors.numpy import load_file
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    groups = {"params": {}, "adam_m": {}, "adam_v": {}}
    for name, t in tensors.items():
        g, _, rest = name.partition(".")
        if g in groups:
            groups[g][rest] = t.astype(np.float32)
    if cfg is not None:
        for name, shape in param_shapes(cfg).items():
            for g, d in groups.items():
                if name not in d:
                    raise KeyError(f"checkpoint {path} lacks {g}.{name}")
                if tuple(d[name].shape) != shape:
                    raise ValueError(
                        f"checkpoint {path}: {g}.{name} has shape {d[name].shape}, "
                        f"the config expects {shape}"
                    )
    return groups["params"], groups["adam_m"], groups["adam_v"], meta


# ---------------------------------------------------------------- layers


def rms_norm(x, scale, eps):
    """x · rsqrt(mean(x²) + eps) · scale over the last dim (scale broadcasts from the right)."""
    ms = jnp.sum(x * x, axis=-1, keepdims=True) * (1.0 / x.shape[-1])
    return x * jax.lax.rsqrt(ms + eps) * scale


def rope(x, theta):
    """Interleaved RoPE on x [B,T,heads,H] at positions 0..T-1."""
    _, t, _, h = x.shape
    freq = jnp.asarray(
        np.array([theta ** (-(2 * i) / h) for i in range(h // 2)], dtype=np.float64).astype(np.float32)
    )
    angle = jnp.arange(t, dtype=F32)[:, None] * freq[None, :]  # [T, H/2]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    return jnp.stack([y0, y1], axis=-1).reshape(x.shape)


def attention(q, k, v, window: int | None):
    """Causal softmax attention (GQA) over the whole T×T score matrix with a mask: q [B,T,N,H]
    (already scaled), k, v [B,T,G,H]; `window` W keeps keys t−W ≤ s ≤ t."""
    b, t, n, h = q.shape
    g = k.shape[2]
    qg = q.reshape(b, t, g, n // g, h)
    s = jnp.einsum("btgrh,bsgh->bgrts", qg, k)
    ti = jnp.arange(t)[:, None]
    si = jnp.arange(t)[None, :]
    mask = si <= ti
    if window is not None:
        mask = mask & (ti - si <= window)
    s = jnp.where(mask, s, jnp.finfo(F32).min)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bgrts,bsgh->btgrh", p, v)
    return o.reshape(b, t, n, h)


def attention_blocked(q, k, v, window: int):
    """Sliding-window attention in blocks of W queries, each against its own and the previous
    block of keys (2W keys, not T): the same result as `attention(q, k, v, window)`."""
    b, t, n, h = q.shape
    g = k.shape[2]
    c = max(window, 1)
    tp = -(-t // c) * c
    nb = tp // c
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    qb = jnp.pad(q, pad).reshape(b, nb, c, g, n // g, h)

    def two_blocks(x):
        xb = jnp.pad(x, pad).reshape(b, nb, c, g, h)
        prev = jnp.pad(xb, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :nb]
        return jnp.concatenate([prev, xb], axis=2)  # [B, nb, 2c, G, H]

    kk, vv = two_blocks(k), two_blocks(v)
    s = jnp.einsum("bncgrh,bndgh->bngrcd", qb, kk)
    tq = jnp.arange(nb)[:, None, None] * c + jnp.arange(c)[None, :, None]  # absolute query pos
    tk = jnp.arange(nb)[:, None, None] * c - c + jnp.arange(2 * c)[None, None, :]  # absolute key pos
    mask = (tk >= 0) & (tk <= tq) & (tq - tk <= window)  # [nb, c, 2c]
    s = jnp.where(mask[None, :, None, None], s, jnp.finfo(F32).min)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bngrcd,bndgh->bncgrh", p, vv)
    return o.reshape(b, tp, n, h)[:, :t]


def feature(x, kind: str):
    """φ over the head dim: [softmax(x), softmax(−x)] or [relu(x), relu(−x)]; H → 2H."""
    if kind == "softmax":
        return jnp.concatenate([jax.nn.softmax(x, axis=-1), jax.nn.softmax(-x, axis=-1)], axis=-1)
    if kind == "relu":
        return jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)
    raise ValueError(f"rla.feature_map {kind!r} is not softmax or relu")


def rla(q, k, v, window: int, chunk: int, fm: str, impl: str = "parallel"):
    """Residual linear attention, chunked: o_t = φ(q_t) Σ_{s ≤ t−W−1} φ(k_s)ᵀ v_s on raw q
    [B,T,N,H], k, v [B,T,G,H]. Keys/values are shifted by W+1 (zeros in front: a zero value row
    makes φ(k)ᵀv vanish, so φ(0) ≠ 0 does no harm); then within a chunk a masked quadratic
    product, across chunks the state."""
    b, t, n, h = q.shape
    g = k.shape[2]
    r = n // g
    shift = window + 1
    ks = jnp.pad(k, ((0, 0), (shift, 0), (0, 0), (0, 0)))[:, :t]
    vs = jnp.pad(v, ((0, 0), (shift, 0), (0, 0), (0, 0)))[:, :t]
    c = min(chunk, t)
    tp = -(-t // c) * c
    pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
    fq = feature(jnp.pad(q, pad), fm).reshape(b, tp // c, c, g, r, 2 * h)
    fk = feature(jnp.pad(ks, pad), fm).reshape(b, tp // c, c, g, 2 * h)
    vc = jnp.pad(vs, pad).reshape(b, tp // c, c, g, h)
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))
    if impl == "parallel":
        kv = jnp.einsum("bncgf,bncgh->bngfh", fk, vc)  # per-chunk state increments
        state = jnp.cumsum(kv, axis=1)
        state = jnp.concatenate([jnp.zeros_like(state[:, :1]), state[:, :-1]], axis=1)
        inter = jnp.einsum("bncgrf,bngfh->bncgrh", fq, state)
        a = jnp.einsum("bncgrf,bndgf->bngrcd", fq, fk)
        a = jnp.where(causal, a, 0.0)
        intra = jnp.einsum("bngrcd,bndgh->bncgrh", a, vc)
        o = inter + intra
    elif impl == "scan":

        def body(s, xs):
            fq_j, fk_j, v_j = xs  # [B,C,G,R,2H], [B,C,G,2H], [B,C,G,H]
            a = jnp.einsum("bcgrf,bdgf->bgrcd", fq_j, fk_j)
            a = jnp.where(causal, a, 0.0)
            o_j = jnp.einsum("bcgrf,bgfh->bcgrh", fq_j, s) + jnp.einsum("bgrcd,bdgh->bcgrh", a, v_j)
            return s + jnp.einsum("bcgf,bcgh->bgfh", fk_j, v_j), o_j

        s0 = jnp.zeros((b, g, 2 * h, h), F32)
        xs = (jnp.moveaxis(fq, 1, 0), jnp.moveaxis(fk, 1, 0), jnp.moveaxis(vc, 1, 0))
        _, o = jax.lax.scan(body, s0, xs)
        o = jnp.moveaxis(o, 0, 1)
    else:
        raise ValueError(f"rla impl {impl!r} is not parallel or scan")
    return o.reshape(b, tp, n, h)[:, :t]


def forward(
    params,
    tokens,
    cfg: Config,
    rla_impl: str = "parallel",
    rla_chunk: int | None = None,
    swa_impl: str = "masked",
):
    """Logits [B,T,vocab] (f32) for tokens [B,T] (int32). `swa_impl`: `masked` (the whole T×T
    scores with a band mask) or `blocked` ([`attention_blocked`])."""
    m = cfg.model
    n, g, h = m["heads"], m["kv_heads"], m["head_dim"]
    eps, w = m["norm_eps"], m["window"]
    chunk = rla_chunk or m["rla"]["sub_chunk"]
    x = params["embed"][tokens]
    b, t, _ = x.shape
    for i, kind in enumerate(cfg.layer_kinds()):
        p = f"layers.{i}"
        xn = rms_norm(x, params[f"{p}.attn_norm.scale"], eps)
        q = (xn @ params[f"{p}.attn.wq"]).reshape(b, t, n, h)
        k = (xn @ params[f"{p}.attn.wk"]).reshape(b, t, g, h)
        v = (xn @ params[f"{p}.attn.wv"]).reshape(b, t, g, h)
        qn, kn = q, k
        if m["qk_norm"]:
            qn = rms_norm(q, params[f"{p}.attn.q_norm.scale"], eps)
            kn = rms_norm(k, params[f"{p}.attn.k_norm.scale"], eps)
        inv = 1.0 / math.sqrt(h)
        if kind == "global":
            if m["global_rope"]:
                qn, kn = rope(qn, m["rope_theta"]), rope(kn, m["rope_theta"])
            ctx = attention(qn * F32(inv), kn, v, None)
        else:
            theta = m["rope_theta"]
            qr, kr = rope(qn, theta) * F32(inv), rope(kn, theta)
            if swa_impl == "masked":
                ctx = attention(qr, kr, v, w)
            elif swa_impl == "blocked":
                ctx = attention_blocked(qr, kr, v, w)
            else:
                raise ValueError(f"swa impl {swa_impl!r} is not masked or blocked")
            if kind == "rattention":
                o_rla = rla(q, k, v, w, chunk, m["rla"]["feature_map"], rla_impl)
                if m["rla"]["norm"]:
                    o_rla = rms_norm(o_rla, params[f"{p}.attn.rla_norm.scale"], 1e-8)
                ctx = rms_norm(ctx, params[f"{p}.attn.swa_norm.scale"], 1e-8) + o_rla
        x = x + ctx.reshape(b, t, n * h) @ params[f"{p}.attn.wo"]
        xn = rms_norm(x, params[f"{p}.ffn_norm.scale"], eps)
        gate = xn @ params[f"{p}.ffn.w_gate"]
        up = xn @ params[f"{p}.ffn.w_up"]
        if m["ffn_activation"] == "swiglu":
            act = gate * jax.nn.sigmoid(gate)
        else:
            act = 0.5 * gate * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3)))
        x = x + (act * up) @ params[f"{p}.ffn.w_down"]
    xn = rms_norm(x, params["final_norm.scale"], eps)
    head = params["embed"].T if m["tied_embeddings"] else params["lm_head"]
    return xn @ head


def loss_fn(params, tokens, weights, cfg: Config, **kw):
    """Σ w·nll / max(Σ w, 1) of tokens [B, T+1] (inputs the first T, targets the last T)."""
    logits = forward(params, tokens[:, :-1], cfg, **kw)
    targets = tokens[:, 1:]
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = (lse - tgt) * weights
    return jnp.sum(nll) / jnp.maximum(jnp.sum(weights), 1.0)


def lr_at(train: dict, step):
    """Linear warmup to `lr`, then cosine to `lr·min_lr_ratio` (step.rs `lr_graph`, in f32)."""
    c = lambda v: F32(v)  # noqa: E731
    lr, warmup, steps = train["lr"], train["warmup"], train["steps"]
    warm = c(lr) * (step + c(1.0)) / c(max(warmup, 1))
    span = max(steps - warmup, 1) if steps > warmup else 1
    progress = jnp.clip((step - c(warmup)) / c(span), c(0.0), c(1.0))
    lo = lr * train["min_lr_ratio"]
    decay = c(lo) + c((lr - lo) * 0.5) * (jnp.cos(progress * c(math.pi)) + c(1.0))
    return jnp.where(step < c(warmup), warm, decay)


def make_train_step(cfg: Config, **kw):
    """jit(value_and_grad) + clipping + schedule + AdamW; (params, m, v, step f32, tokens,
    weights) → (params, m, v, loss, grad_norm, lr), with params and moments donated."""
    tr = cfg.train
    c = lambda v: F32(v)  # noqa: E731

    def step_fn(params, adam_m, adam_v, step, tokens, weights):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, weights, cfg, **kw)
        gnorm = jnp.sqrt(sum(jnp.sum(g * g) for g in grads.values()))
        if tr["clip_norm"] > 0:
            scale = jnp.minimum(c(1.0), c(tr["clip_norm"]) / (gnorm + c(1e-6)))
        else:
            scale = c(1.0)
        lr = lr_at(tr, step)
        t1 = step + c(1.0)
        bc1 = c(1.0) - jnp.power(c(tr["beta1"]), t1)
        bc2 = c(1.0) - jnp.power(c(tr["beta2"]), t1)
        new_p, new_m, new_v = {}, {}, {}
        for name, p in params.items():
            gi = grads[name] * scale
            m1 = adam_m[name] * c(tr["beta1"]) + gi * c(1.0 - tr["beta1"])
            v1 = adam_v[name] * c(tr["beta2"]) + (gi * gi) * c(1.0 - tr["beta2"])
            upd = (m1 / bc1) / (jnp.sqrt(v1 / bc2) + c(tr["eps"]))
            if decays(name) and tr["weight_decay"] > 0:
                upd = upd + p * c(tr["weight_decay"])
            new_p[name] = p - upd * lr
            new_m[name], new_v[name] = m1, v1
        return new_p, new_m, new_v, loss, gnorm, lr

    return jax.jit(step_fn, donate_argnums=(0, 1, 2))


# ---------------------------------------------------------------- data (crates/trainer/src/data.rs)

_M64 = (1 << 64) - 1


def mix(x: int) -> int:
    """splitmix64 finaliser of data.rs `mix`."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def stream_batch(tokens: np.ndarray, first: int, batch: int, seq_len: int):
    """The batch `rattn` cuts from a flat token stream (`data.kind = "tokens"`): sequences
    `first .. first+batch`, tokens int32 [B, T+1] and weights f32 [B, T] (all 1)."""
    n, span = len(tokens), seq_len + 1
    windows = max((max(n - span, 0)) // seq_len, 1)
    rows = []
    for i in range(batch):
        start = ((mix(first + i) % windows) * seq_len) % n
        rows.append(tokens[(start + np.arange(span)) % n])
    return np.stack(rows).astype(np.int32), np.ones((batch, seq_len), np.float32)
