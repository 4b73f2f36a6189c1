//! Sequence parallelism inside a manually partitioned region: the collectives a shard of the
//! sequence needs from the others — a halo of the previous tokens (`collective-permute`, over
//! several shards when it is longer than one), everything gathered (`all-gather`), and an
//! exclusive prefix sum over the shards before this one (all-gather and a masked sum, or from
//! 8 shards on a log-step scan of `collective-permute`s).
//!
//! A region's arrays `[B, T, …]` are laid out by a sharding that cuts T into S pieces of
//! T/S tokens; shard `i` holds tokens `i·T/S .. (i+1)·T/S`. [`SeqShards::new`] reads the
//! devices of each line of shards from that sharding (one line per position of the other cuts:
//! batch, heads, replicas), so every collective runs within those lines only.
//!
//! ```no_run
//! use hlo_builder::{Builder, ElementType, Shape, Sharding};
//! use pallas_port::seq::SeqShards;
//! let b = Builder::new("halo");
//! let x = b.parameter(Shape::array(ElementType::F32, &[1, 16, 2, 4]), "x")?;
//! let s = Sharding::tiled(&[1, 4, 1, 1]); // T cut in 4 over devices 0..4
//! let seq = SeqShards::new(&b, &s, 4, 1)?; // outside the manual scope
//! let xl = b.full_to_shard(x, s.clone())?; // [1, 4, 2, 4] per device
//! let _m = b.manual_scope();
//! let prev = seq.halo(&b, xl, 1, 6)?; // the 6 tokens before this shard: [1, 6, 2, 4]
//! # Ok::<(), hlo_builder::Error>(())
//! ```

use hlo_builder::{Builder, Cmp, ElementType, Op, Result, Sharding};

/// The number of sequence shards from which [`SeqShards::exclusive_sum`] scans with
/// `collective-permute`s instead of gathering: with RLA's states `[B,G,2H,H]` in the sharded
/// train step (`benches/sharded_step.rs`, T 256 B 8) the scan took 3–6 % off seq 8's step CPU
/// time and nothing off data 2 × seq 4's (two runs each, `docs/results/seq-kernel/README.md`).
pub const SCAN_SHARDS: usize = 8;

/// The shards of the sequence dim of a manual region's arrays, and this device's place among
/// them. Made outside the manual scope ([`SeqShards::new`]); its methods build ops inside it.
#[derive(Debug, Clone)]
pub struct SeqShards {
    /// Per line of shards, its devices in sequence order.
    groups: Vec<Vec<i64>>,
    /// This device's `[1, …, 1]` piece of the tile grid's sequence index.
    index_piece: Op,
}

impl SeqShards {
    /// The sequence shards of arrays of rank `rank` laid out by `sharding`, whose dim `dim` is
    /// the sequence. Call it outside the manual scope: it enters the region with this device's
    /// shard index (an iota over the tile grid, cut by the same sharding).
    pub fn new(b: &Builder, sharding: &Sharding, rank: usize, dim: usize) -> Result<SeqShards> {
        let err = |m: String| b.error("seq_shards", m);
        let tiles = sharding
            .tiles_per_dim(rank)
            .map_err(|e| err(e.message.clone()))?;
        let groups = sharding
            .groups_along(dim, rank)
            .map_err(|e| err(e.message.clone()))?;
        let grid: Vec<i64> = tiles.iter().map(|&t| t as i64).collect();
        let iota = b.iota(ElementType::S32, &grid, dim)?;
        let index_piece = b.full_to_shard(iota, sharding.clone())?;
        Ok(SeqShards {
            groups,
            index_piece,
        })
    }

    /// S, the number of sequence shards.
    pub fn shards(&self) -> usize {
        self.groups.first().map_or(1, Vec::len)
    }

    /// The replica groups of a collective over the sequence shards (global device ids).
    pub fn groups(&self) -> &[Vec<i64>] {
        &self.groups
    }

    /// This device's shard index, `s32[]` (inside the manual scope).
    pub fn index(&self, b: &Builder) -> Result<Op> {
        b.reshape(self.index_piece, &[])
    }

    /// The `(source, target)` pairs that send each shard's value `hops` shards ahead.
    fn pairs(&self, hops: usize) -> Vec<(i64, i64)> {
        self.groups
            .iter()
            .flat_map(|g| (0..g.len().saturating_sub(hops)).map(move |i| (g[i], g[i + hops])))
            .collect()
    }

    /// The `len` tokens before this shard's first one, along `dim` of the local piece `x`
    /// (`x`'s dim holds the shard's T/S tokens): collective-permutes from the shards
    /// 1, 2, … ⌈len / (T/S)⌉ back, the farthest sending only the tail it must. Positions
    /// before the sequence start are zeros. `len` is at most (S − 1)·T/S.
    pub fn halo(&self, b: &Builder, x: Op, dim: usize, len: usize) -> Result<Op> {
        let dims = b.shape(x)?.dims().to_vec();
        let tl = dims[dim] as usize;
        let s = self.shards();
        if len == 0 || tl == 0 || len > (s - 1) * tl {
            return Err(b.error(
                "seq_halo",
                format!(
                    "a halo of {len} tokens must be 1 ..= (S − 1)·T/S = {} (S = {s} shards of \
                     {tl} tokens)",
                    (s - 1) * tl
                ),
            ));
        }
        let hops = len.div_ceil(tl);
        let mut parts = Vec::with_capacity(hops);
        for j in (1..=hops).rev() {
            let send = if j == hops && len < hops * tl {
                let keep = len - (hops - 1) * tl;
                b.slice_in_dim(x, (tl - keep) as i64, tl as i64, dim)?
            } else {
                x
            };
            parts.push(b.collective_permute(send, &self.pairs(j))?);
        }
        if parts.len() == 1 {
            Ok(parts[0])
        } else {
            b.concatenate(&parts, dim as i64)
        }
    }

    /// Shard `j`'s `x` sent to shard `to[j]` (one `collective-permute` within each line of
    /// shards; `to` must be a permutation of `0..S`). The identity moves nothing and returns `x`.
    pub fn permute(&self, b: &Builder, x: Op, to: &[usize]) -> Result<Op> {
        let s = self.shards();
        let mut seen = vec![false; s];
        let ok = to.len() == s
            && to
                .iter()
                .all(|&t| t < s && !std::mem::replace(&mut seen[t], true));
        if !ok {
            return Err(b.error(
                "seq_permute",
                format!("targets {to:?} must be a permutation of the {s} sequence shards"),
            ));
        }
        if to.iter().enumerate().all(|(j, &t)| j == t) {
            return Ok(x);
        }
        let pairs: Vec<(i64, i64)> = self
            .groups
            .iter()
            .flat_map(|g| to.iter().enumerate().map(move |(j, &t)| (g[j], g[t])))
            .collect();
        b.collective_permute(x, &pairs)
    }

    /// Every shard's `x` concatenated along `dim`, in sequence order (`all-gather`).
    pub fn all_gather(&self, b: &Builder, x: Op, dim: usize) -> Result<Op> {
        b.all_gather(x, dim as i64, &self.groups)
    }

    /// Every shard's `x` stacked on a new leading dim `[S, …]`.
    fn stack(&self, b: &Builder, x: Op) -> Result<Op> {
        let mut dims = vec![1];
        dims.extend_from_slice(b.shape(x)?.dims());
        self.all_gather(b, b.reshape(x, &dims)?, 0)
    }

    /// Σ of `x` (float) over the shards before this one (zeros on shard 0). Below
    /// [`SCAN_SHARDS`] shards: every shard's value gathered (`all-gather`), masked by
    /// `shard < index` and summed. From [`SCAN_SHARDS`] on: a log-step scan of ⌈log₂ S⌉ rounds,
    /// each one `collective-permute` of the running inclusive sum `d` shards ahead (d = 1, 2, 4,
    /// …; the first d shards of a line receive zeros), whose arrival is added both to the
    /// running sum and to the result: each device moves and adds ~log₂ S copies of `x` where the
    /// gather and the masked sum touch S, and no subtraction rounds the result.
    pub fn exclusive_sum(&self, b: &Builder, x: Op) -> Result<Op> {
        let s = self.shards();
        if s >= SCAN_SHARDS {
            // After the round with shift d: `sum_i` = Σ x_j over i − 2d < j ≤ i and `before_i`
            // = Σ x_j over i − 2d < j < i (j ≥ 0); the rounds stop once 2d ≥ S covers every
            // earlier shard.
            let mut sum = x;
            let mut before: Option<Op> = None;
            let mut d = 1;
            while d < s {
                let got = b.collective_permute(sum, &self.pairs(d))?;
                before = Some(match before {
                    None => got,
                    Some(acc) => b.add(acc, got)?,
                });
                d *= 2;
                if d < s {
                    sum = b.add(sum, got)?;
                }
            }
            return Ok(before.expect("S ≥ SCAN_SHARDS ≥ 2 runs a round"));
        }
        let all = self.stack(b, x)?;
        let dims = b.shape(all)?.dims().to_vec();
        let ty = b.shape(x)?.ty().unwrap_or(ElementType::F32);
        let before = b.compare(
            b.iota(ElementType::S32, &[dims[0]], 0)?,
            b.broadcast_in_dim(self.index(b)?, &[dims[0]], &[])?,
            Cmp::Lt,
        )?;
        let mask = b.broadcast_in_dim(b.convert(before, ty)?, &dims, &[0])?;
        b.reduce_sum(b.mul(all, mask)?, &[0])
    }

    /// The last shard's `x`, on every shard.
    pub fn last(&self, b: &Builder, x: Op) -> Result<Op> {
        let all = self.stack(b, x)?;
        let s = b.shape(all)?.dims()[0];
        let rest = b.shape(x)?.dims().to_vec();
        b.reshape(b.slice_in_dim(all, s - 1, s, 0)?, &rest)
    }
}

/// The layout, over the devices of `qkv` (a sharding of rank-4 `[B, T, heads, H]` arrays), of an
/// array whose dim `i` is cut like `qkv`'s dim `from[i]` (`None`: not cut); the devices of
/// every cut of `qkv` no dim takes (and `qkv`'s own replicas) hold copies. States `[B, G, …]`
/// take `[Some(0), Some(2), None, …]`.
pub fn derived_sharding(qkv: &Sharding, from: &[Option<usize>]) -> Sharding {
    let Sharding::Tiled {
        tile_assignment_dims: t,
        devices,
        ..
    } = qkv
    else {
        return qkv.clone();
    };
    let taken: Vec<usize> = from.iter().flatten().copied().collect();
    let mut dims: Vec<i64> = from.iter().map(|f| f.map_or(1, |d| t[d])).collect();
    let rest: Vec<usize> = (0..t.len()).filter(|d| !taken.contains(d)).collect();
    let reps: i64 = rest.iter().map(|&d| t[d]).product();
    if dims.iter().all(|&d| d == 1) {
        return Sharding::Replicated;
    }
    let mut out = vec![0i64; devices.len()];
    for (pos, &dev) in devices.iter().enumerate() {
        // Row-major coordinates of `pos` over `t`.
        let mut c = vec![0i64; t.len()];
        let mut r = pos as i64;
        for (ci, &ti) in c.iter_mut().zip(t).rev() {
            *ci = r % ti;
            r /= ti;
        }
        let mut idx = 0i64;
        for (f, &d) in from.iter().zip(&dims) {
            idx = idx * d + f.map_or(0, |s| c[s]);
        }
        let mut rep = 0i64;
        for &d in &rest {
            rep = rep * t[d] + c[d];
        }
        out[(idx * reps + rep) as usize] = dev;
    }
    if reps > 1 {
        dims.push(reps);
    }
    Sharding::Tiled {
        tile_assignment_dims: dims,
        devices: out,
        last_tile_dim_replicate: reps > 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_shardings_keep_each_device_on_its_cut() {
        // data 2 × seq 2 × tensor 2 on [B, T, G, H]: devices in data, seq, tensor order.
        let qkv = Sharding::tiled(&[2, 2, 2, 1]);
        // States [B, G, 2H, H]: the batch and head cuts; seq becomes replication.
        let st = derived_sharding(&qkv, &[Some(0), Some(2), None, None]);
        assert_eq!(
            st,
            Sharding::Tiled {
                tile_assignment_dims: vec![2, 2, 1, 1, 2],
                devices: vec![0, 2, 1, 3, 4, 6, 5, 7],
                last_tile_dim_replicate: true,
            }
        );
        // Without a seq cut it is the same tile assignment with the T dim dropped.
        let qkv = Sharding::Tiled {
            tile_assignment_dims: vec![2, 1, 2, 1, 2],
            devices: (0..8).collect(),
            last_tile_dim_replicate: true,
        };
        assert_eq!(
            derived_sharding(&qkv, &[Some(0), Some(2), None, None]),
            Sharding::Tiled {
                tile_assignment_dims: vec![2, 2, 1, 1, 2],
                devices: (0..8).collect(),
                last_tile_dim_replicate: true,
            }
        );
        assert_eq!(
            derived_sharding(&Sharding::tiled(&[1, 4, 1, 1]), &[Some(0), Some(2)]),
            Sharding::Replicated
        );
    }
}
