//! The decode cache, defined once: which buffers each layer keeps, their names, shapes and dtypes.
//! The prefill's outputs, the decode step's cache parameters and outputs, the buffer list and both
//! byte counts all derive from [`CacheLayout`].
//!
//! Per layer, in stack order:
//! - local layer ([`LayerCache::Ring`]): ring buffers `k_ring`, `v_ring` `[B, G, W+1, H]`; token
//!   `p` lives in slot `p mod (W+1)`. `k_ring` holds the keys as SWA reads them, after qk-norm and
//!   RoPE at the token's own position (rotated once, when written), so a decode step does no RoPE
//!   over the ring. RAttention layers also keep `rla_state [B, G, 2H, H]` = Σ φ(k_s)ᵀ v_s over the
//!   tokens that have left the window. RLA absorbs the *raw* key of the token leaving the window:
//!   without qk-norm it is the ring's key rotated back (one position's RoPE per step); with qk-norm
//!   (not invertible) the layer also keeps `k_raw [B, G, W+1, H]`, the raw keys.
//! - global layer ([`LayerCache::Full`]): `k`, `v` `[B, G, max_len, H]`; `k` is stored after
//!   qk-norm, and rotated at its absolute position with `global_rope` (what attention reads).
//!
//! Keys and values are head-major (`[B, G, slots, H]`): the decode step's score dot contracts the
//! minor dim of both operands and the value dot reads rows, so XLA inserts no transposing copy of
//! the cache before either dot.

use crate::model::{Attention, Model};
use crate::params::LogicalAxis;
use hlo_builder::{Builder, ElementType, Op, Result, Shape};
use serde::Serialize;

/// The cache one layer keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCache {
    /// A local layer: ring buffers of the last W+1 keys (after qk-norm and RoPE) and values, plus
    /// the RLA state when `rla_state` and the raw keys when `raw_keys`.
    Ring {
        /// The layer keeps an RLA state (RAttention layers).
        rla_state: bool,
        /// The layer keeps the raw keys too (RAttention with qk-norm: the normalised key cannot be
        /// turned back into the raw key RLA absorbs).
        raw_keys: bool,
    },
    /// A global layer: keys (after qk-norm, rotated with `global_rope`) and values of every
    /// position below `max_len`.
    Full,
}

impl LayerCache {
    /// The cache of a layer with this attention, in a model with or without `qk_norm`.
    pub fn of(attn: Attention, qk_norm: bool) -> LayerCache {
        match attn {
            Attention::Global => LayerCache::Full,
            a => LayerCache::Ring {
                rla_state: a.has_rla(),
                raw_keys: a.has_rla() && qk_norm,
            },
        }
    }

    /// Buffers of this layer: k, v, then the raw keys and the RLA state where there are.
    fn buffer_count(&self) -> usize {
        match *self {
            LayerCache::Ring {
                rla_state,
                raw_keys,
            } => 2 + rla_state as usize + raw_keys as usize,
            LayerCache::Full => 2,
        }
    }
}

/// What a cache buffer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CachePart {
    /// Keys as attention reads them (a ring buffer or the full cache).
    Key,
    /// Raw keys of a local RAttention layer with qk-norm (what RLA absorbs).
    RawKey,
    /// Values (a ring buffer or the full cache).
    Value,
    /// The RLA state `S`.
    RlaState,
}

/// One buffer of the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheBuffer {
    /// Layer index.
    pub layer: usize,
    /// What it holds.
    pub part: CachePart,
    /// `layers.{i}.k_ring`, `layers.{i}.v_ring`, `layers.{i}.k_raw`, `layers.{i}.rla_state`,
    /// `layers.{i}.k`, `layers.{i}.v`.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Element type of the buffer.
    pub dtype: ElementType,
    /// The logical axis of each dimension, for sharding rules: k/v
    /// `[batch, kv_heads, cache_length, head_dim]`, the RLA state `[batch, kv_heads, feature,
    /// head_dim]`.
    pub axes: Vec<LogicalAxis>,
}

impl CacheBuffer {
    /// Bytes of the buffer.
    pub fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.byte_size()) as u64
    }
}

/// One layer's cache buffers as graph values.
#[derive(Debug, Clone, Copy)]
pub struct LayerCacheOps {
    /// Keys.
    pub k: Op,
    /// Values.
    pub v: Op,
    /// The raw keys of layers with [`LayerCache::Ring`]`{ raw_keys: true }`.
    pub k_raw: Option<Op>,
    /// The RLA state of RAttention layers.
    pub rla_state: Option<Op>,
}

/// Per-sequence decode cache bytes, for comparing RAttention, SWA and full attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CacheBytes {
    /// Keys and values of every layer.
    pub kv: u64,
    /// RLA states of the RAttention local layers.
    pub rla_state: u64,
}

impl CacheBytes {
    /// `kv + rla_state`.
    pub fn total(&self) -> u64 {
        self.kv + self.rla_state
    }
}

impl LayerCache {
    /// This layer's [`LayerCacheOps`] from its buffers' values in [`CacheLayout::layer_buffers`]
    /// order.
    fn ops(&self, ops: &[Op]) -> LayerCacheOps {
        let raw = matches!(self, LayerCache::Ring { raw_keys: true, .. });
        let state = matches!(
            self,
            LayerCache::Ring {
                rla_state: true,
                ..
            }
        );
        LayerCacheOps {
            k: ops[0],
            v: ops[1],
            k_raw: raw.then(|| ops[2]),
            rla_state: state.then(|| ops[2 + raw as usize]),
        }
    }
}

/// The decode cache of a model for `batch` sequences of up to `max_len` tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheLayout {
    /// Sequences.
    pub batch: usize,
    /// Positions the global caches hold.
    pub max_len: usize,
    /// Sliding window W (ring buffers hold W+1 slots).
    pub window: usize,
    /// Key/value heads G.
    pub kv_heads: usize,
    /// Head dim H.
    pub head_dim: usize,
    /// Element type of every buffer (f32 in this implementation).
    pub dtype: ElementType,
    /// Element type of keys and values in the paper's accounting ([`CacheLayout::nominal_bytes`]):
    /// the activation dtype.
    pub activation: ElementType,
    /// Every layer's cache, in stack order.
    pub layers: Vec<LayerCache>,
}

impl CacheLayout {
    /// The layout of `model`'s cache.
    pub fn new(model: &Model, batch: usize, max_len: usize) -> CacheLayout {
        let cfg = model.config();
        CacheLayout {
            batch,
            max_len,
            window: cfg.window,
            kv_heads: cfg.kv_heads,
            head_dim: cfg.head_dim,
            dtype: ElementType::F32,
            activation: cfg.dtype.element_type(),
            layers: model
                .layers()
                .iter()
                .map(|&a| LayerCache::of(a, cfg.qk_norm))
                .collect(),
        }
    }

    /// The buffers of layer `layer`, in order: k, v, then the raw keys and the RLA state where
    /// the layer keeps them.
    pub fn layer_buffers(&self, layer: usize) -> Vec<CacheBuffer> {
        let (bs, g, h) = (self.batch, self.kv_heads, self.head_dim);
        use LogicalAxis::{Batch, CacheLength, Feature, HeadDim, KvHeads};
        let buf = |part, suffix: &str, shape: Vec<usize>| CacheBuffer {
            layer,
            part,
            name: format!("layers.{layer}.{suffix}"),
            shape,
            dtype: self.dtype,
            axes: match part {
                CachePart::RlaState => vec![Batch, KvHeads, Feature, HeadDim],
                CachePart::Key | CachePart::RawKey | CachePart::Value => {
                    vec![Batch, KvHeads, CacheLength, HeadDim]
                }
            },
        };
        match self.layers[layer] {
            LayerCache::Ring {
                rla_state,
                raw_keys,
            } => {
                let ring = vec![bs, g, self.window + 1, h];
                let mut v = vec![
                    buf(CachePart::Key, "k_ring", ring.clone()),
                    buf(CachePart::Value, "v_ring", ring.clone()),
                ];
                if raw_keys {
                    v.push(buf(CachePart::RawKey, "k_raw", ring));
                }
                if rla_state {
                    v.push(buf(CachePart::RlaState, "rla_state", vec![bs, g, 2 * h, h]));
                }
                v
            }
            LayerCache::Full => {
                let full = vec![bs, g, self.max_len, h];
                vec![
                    buf(CachePart::Key, "k", full.clone()),
                    buf(CachePart::Value, "v", full),
                ]
            }
        }
    }

    /// Every buffer, layer by layer: the order of the prefill's cache outputs and of the decode
    /// step's cache parameters and outputs.
    pub fn buffers(&self) -> Vec<CacheBuffer> {
        (0..self.layers.len())
            .flat_map(|i| self.layer_buffers(i))
            .collect()
    }

    /// What the buffers allocate (W+1 ring slots, `max_len` global positions, all in `dtype`).
    pub fn allocated_bytes(&self) -> CacheBytes {
        let mut c = CacheBytes {
            kv: 0,
            rla_state: 0,
        };
        for buf in self.buffers() {
            match buf.part {
                CachePart::RlaState => c.rla_state += buf.bytes(),
                CachePart::Key | CachePart::RawKey | CachePart::Value => c.kv += buf.bytes(),
            }
        }
        c
    }

    /// The paper's accounting at a context of `max_len` tokens: k and v in the `activation` dtype,
    /// a local layer counting its `min(W, max_len)`-token window, a global layer the whole
    /// context; RLA states `G · 2H · H` in `dtype`, independent of the context. The ring buffer's
    /// extra slot holds the token being decoded, which every attention variant needs as well, so
    /// it is not counted (it adds 1/W to the local term in [`CacheLayout::allocated_bytes`]); nor
    /// is `k_raw`, a second copy of the keys this implementation keeps so that no step rotates the
    /// ring (it is in [`CacheLayout::allocated_bytes`]).
    pub fn nominal_bytes(&self) -> CacheBytes {
        let (g, h) = (self.kv_heads as u64, self.head_dim as u64);
        let act = self.activation.byte_size() as u64;
        let mut out = CacheBytes {
            kv: 0,
            rla_state: 0,
        };
        for layer in &self.layers {
            let tokens = match layer {
                LayerCache::Ring { .. } => self.window.min(self.max_len),
                LayerCache::Full => self.max_len,
            } as u64;
            out.kv += 2 * tokens * g * h * act;
            if let LayerCache::Ring {
                rla_state: true, ..
            } = layer
            {
                out.rla_state += g * 2 * h * h * self.dtype.byte_size() as u64;
            }
        }
        out
    }

    /// Declare every buffer as a parameter of `b`, in [`CacheLayout::buffers`] order.
    pub fn declare(&self, b: &Builder) -> Result<Vec<LayerCacheOps>> {
        (0..self.layers.len())
            .map(|i| {
                let ops = self
                    .layer_buffers(i)
                    .iter()
                    .map(|buf| {
                        let dims: Vec<i64> = buf.shape.iter().map(|&d| d as i64).collect();
                        b.parameter(Shape::array(buf.dtype, &dims), &buf.name)
                    })
                    .collect::<Result<Vec<Op>>>()?;
                Ok(self.layers[i].ops(&ops))
            })
            .collect()
    }

    /// The inverse of [`CacheLayout::flatten`]: one [`LayerCacheOps`] per layer from graph values
    /// in [`CacheLayout::buffers`] order (for example the elements of a `while` carry).
    #[track_caller]
    pub fn unflatten(&self, ops: &[Op]) -> Result<Vec<LayerCacheOps>> {
        let want = self.buffers().len();
        if ops.len() != want {
            return Err(hlo_builder::Error::invalid(
                "model",
                format!("{} cache values for a layout of {want} buffers", ops.len()),
            ));
        }
        let mut rest = ops;
        let mut out = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (mine, tail) = rest.split_at(layer.buffer_count());
            out.push(layer.ops(mine));
            rest = tail;
        }
        Ok(out)
    }

    /// The graph values of every layer's cache, flattened in [`CacheLayout::buffers`] order;
    /// checks that each layer supplies exactly the buffers the layout names.
    #[track_caller]
    pub fn flatten(&self, caches: &[LayerCacheOps]) -> Result<Vec<Op>> {
        if caches.len() != self.layers.len() {
            return Err(hlo_builder::Error::invalid(
                "model",
                format!(
                    "cache of {} layers for a model of {}",
                    caches.len(),
                    self.layers.len()
                ),
            ));
        }
        let mut out = Vec::new();
        for (i, (layer, c)) in self.layers.iter().zip(caches).enumerate() {
            let (wants_raw, wants_state) = match *layer {
                LayerCache::Ring {
                    rla_state,
                    raw_keys,
                } => (raw_keys, rla_state),
                LayerCache::Full => (false, false),
            };
            for (what, wants, has) in [
                ("an RLA state", wants_state, c.rla_state.is_some()),
                ("raw keys", wants_raw, c.k_raw.is_some()),
            ] {
                if wants != has {
                    return Err(hlo_builder::Error::invalid(
                        "model",
                        format!(
                            "layer {i}: cache {layer:?} {} {what}",
                            if wants { "needs" } else { "has no" }
                        ),
                    ));
                }
            }
            out.extend([c.k, c.v]);
            out.extend(c.k_raw);
            out.extend(c.rla_state);
        }
        Ok(out)
    }
}
