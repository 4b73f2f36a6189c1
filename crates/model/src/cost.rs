//! What a model costs: parameters, training FLOPs per token and decode-cache bytes, for the model
//! and its SWA and full-attention baselines. Reports print these numbers; they never recount.

use crate::cache::CacheBytes;
use crate::model::Model;
use crate::params::ParamRole;
use serde::Serialize;

/// Model FLOPs per training token (forward + backward) at the config's `seq_len`, counted as
/// MaxText counts them (`calculate_tflops_training_per_device`): the work the model needs, never
/// recomputation, whatever the implementation executes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Flops {
    /// `6·N` with N the parameters that enter matmuls (all weight matrices except norm scales and
    /// an untied input embedding, which is a gather).
    pub dense: f64,
    /// `6·heads·head_dim·k` per layer: QKᵀ and AV (2 FLOPs per multiply-add, 4·heads·head_dim·k
    /// forward), backward 2× forward, halved for the causal mask as MaxText does; k = seq_len for
    /// global layers and `min(W, seq_len)` for local layers (MaxText's Gemma 2 count halves those
    /// too, which undercounts a window's W keys per query: the conservative side for MFU).
    pub attention: f64,
    /// 3× the chunked RLA forward's nominal FLOPs (`pallas_port::kernel::flops_fwd`; backward 2×
    /// forward, as for the matmuls; the kernels' recomputation is not model work) over `seq_len`.
    pub rla: f64,
}

impl Flops {
    /// Sum of the parts.
    pub fn total(&self) -> f64 {
        self.dense + self.attention + self.rla
    }
}

/// The cost of one model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Cost {
    /// Parameter count.
    pub parameters: u64,
    /// Parameters that enter matmuls (see [`Flops::dense`]).
    pub matmul_parameters: u64,
    /// Training FLOPs per token at `seq_len`.
    pub flops_per_token: Flops,
    /// Context length of the cache numbers.
    pub context: usize,
    /// Per-sequence decode cache at `context` tokens in the paper's accounting
    /// ([`CacheLayout::nominal_bytes`](crate::CacheLayout::nominal_bytes)).
    pub cache: CacheBytes,
    /// What the decode step allocates per sequence for a `context`-token cache
    /// ([`CacheLayout::allocated_bytes`](crate::CacheLayout::allocated_bytes)).
    pub cache_allocated: CacheBytes,
}

/// A model's cost beside its baselines'.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Costs {
    /// This model.
    pub model: Cost,
    /// [`Model::swa_baseline`].
    pub swa: Cost,
    /// [`Model::full_baseline`].
    pub full: Cost,
}

impl Model {
    /// Parameters that enter matmuls: every [`ParamRole::Matrix`], and the embedding when it is
    /// tied (it is then the LM head; untied, it is only a gather).
    pub fn matmul_params(&self) -> u64 {
        let tied = self.config().tied_embeddings;
        self.param_specs()
            .iter()
            .filter(|s| match s.role {
                ParamRole::Matrix => true,
                ParamRole::Embedding => tied,
                ParamRole::NormScale => false,
            })
            .map(|s| s.numel() as u64)
            .sum()
    }

    /// Training FLOPs per token at `seq_len` (see [`Flops`] for the formulas).
    pub fn flops_per_token(&self) -> Flops {
        let m = self.config();
        let t = m.seq_len;
        let qh = (m.heads * m.head_dim) as f64;
        let mut attention = 0.0;
        for attn in self.layers() {
            let keys = if attn.is_local() { m.window.min(t) } else { t };
            attention += 6.0 * qh * keys as f64;
        }
        let rla_layers = self.layers().iter().filter(|a| a.has_rla()).count();
        let rla = if rla_layers == 0 {
            0.0
        } else {
            let rc = self.rla_config();
            let d = pallas_port::RlaDims {
                batch: 1,
                seq: t,
                heads: m.heads,
                kv_heads: m.kv_heads,
                head_dim: m.head_dim,
            };
            let per_layer = 3.0 * pallas_port::kernel::flops_fwd(&rc, &d);
            rla_layers as f64 * per_layer / t as f64
        };
        Flops {
            dense: 6.0 * self.matmul_params() as f64,
            attention,
            rla,
        }
    }

    /// Parameters, FLOPs per training token and per-sequence cache bytes at `context` tokens.
    pub fn cost(&self, context: usize) -> Cost {
        Cost {
            parameters: self.param_count() as u64,
            matmul_parameters: self.matmul_params(),
            flops_per_token: self.flops_per_token(),
            context,
            cache: self.cache_bytes(context),
            cache_allocated: self.cache_layout(1, context).allocated_bytes(),
        }
    }

    /// [`Model::cost`] of this model, its SWA baseline and its full-attention baseline.
    pub fn costs(&self, context: usize) -> Costs {
        Costs {
            model: self.cost(context),
            swa: self.swa_baseline().cost(context),
            full: self.full_baseline().cost(context),
        }
    }
}
