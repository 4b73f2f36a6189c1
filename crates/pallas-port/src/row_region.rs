//! The row-wise kernel pairs (RMS norm, the loss, the embedding) under a mesh: manually
//! partitioned regions over the rows of their operand (the `shard_map` pattern of the RLA and
//! attention regions: `full_to_shard`, the custom call `{manual}` on each device's piece,
//! `shard_to_full`). XLA's SPMD partitioner cannot split our custom calls; their rows are
//! independent, so each device runs the kernel on its own rows.
//!
//! An operand `x [rows..., features...]` is laid out by a sharding that may cut the row dims
//! (batch over data/fsdp, length over seq) but not the last dim, which the kernel reduces over
//! (D of the norm, V of the loss); dims between may be cut where the parameter is cut alike
//! (the heads of a group norm's `[N, H]` scale).
//!
//! What the pieces share goes in as a copy per row piece: a parameter `p` is broadcast to
//! `[G, p...]` (G = the number of row pieces), cut over G, and each device takes its row
//! (`[1, p...]`). The transpose of that broadcast is the sum over G, which the partitioner
//! lowers to an all-reduce (or a reduce-scatter to the parameter's own layout): the parameter
//! gradients computed per piece (a norm's dscale, the embedding table's gradient) come back
//! summed over the devices whose rows differ, and not over devices that hold the same rows
//! (replicas over an axis the rows do not use). Per-piece scalars leave the same way: `[1]` per
//! device, a `[G]` value cut over G, summed outside the region.

use hlo_builder::{Builder, Op, Result, Sharding};

/// The row layout of a region: the sharding of its operand `x` (rank `rank`, the first `rows`
/// dims the rows), its tiles per dim and the number of row pieces G.
pub(crate) struct Rows {
    sharding: Sharding,
    tiles: Vec<usize>,
    rows: usize,
}

impl Rows {
    /// The layout of `x` of `dims` under `sharding`, whose first `rows` dims are the rows (a
    /// sharding that cuts nothing makes a region whose one piece is the whole value on every
    /// device: XLA's partitioner must not see the custom calls outside a region). Errors (naming `op`, the dims and the sharding): a sharding without tiles per dim
    /// (maximal, tuple, manual), a cut of the last dim (the kernel's feature dim), or a dim that
    /// does not divide.
    #[track_caller]
    pub(crate) fn new(
        b: &Builder,
        op: &'static str,
        sharding: &Sharding,
        dims: &[i64],
        rows: usize,
    ) -> Result<Rows> {
        let udims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
        let tiles = sharding
            .tiles_per_dim(dims.len())
            .and_then(|t| sharding.shard_dims(&udims).map(|_| t))
            .map_err(|e| b.error(op, format!("operand {dims:?}: {}", e.message)))?;
        if let Some(&last) = tiles.last().filter(|&&t| t > 1) {
            return Err(b.error(
                op,
                format!(
                    "the kernel reduces over the last dim of its operand {dims:?}, which must be \
                     whole on each device, but the sharding {sharding:?} cuts it into {last} \
                     pieces (lower the op as HLO where the mesh cuts that dim)"
                ),
            ));
        }
        Ok(Rows {
            sharding: sharding.clone(),
            tiles,
            rows,
        })
    }

    /// The operand's sharding.
    pub(crate) fn sharding(&self) -> &Sharding {
        &self.sharding
    }

    /// G, the number of row pieces (the product of the row dims' tiles).
    pub(crate) fn pieces(&self) -> usize {
        self.tiles[..self.rows].iter().product()
    }

    /// The layout of a `[G, rest...]` value whose dim 0 is the row pieces and whose other dims
    /// are cut as `rest_tiles`, on the same devices: the operand's tile assignment with its row
    /// dims merged into one (row-major, so each device keeps its place) and its other dims
    /// replaced by `rest_tiles`, whose product must be theirs (the same cuts, with whole dims
    /// added or dropped). Devices that hold the same rows hold the same row of the result.
    fn stacked(&self, rest_tiles: &[usize]) -> Sharding {
        let mut dims = vec![self.pieces()];
        dims.extend(rest_tiles);
        self.retiled(&dims)
    }

    /// The layout of the operand's row dims alone (the per-row data of the loss and the
    /// embedding: targets, weights, ids): its sharding without the last dim, which is whole.
    pub(crate) fn row_sharding(&self) -> Sharding {
        self.retiled(&self.tiles[..self.tiles.len() - 1])
    }

    /// The operand's tile assignment over the tiles `dims` (the same devices in the same
    /// row-major order: `dims` must have the product of the operand's tiles), its replication
    /// kept.
    fn retiled(&self, dims: &[usize]) -> Sharding {
        let Sharding::Tiled {
            tile_assignment_dims,
            devices,
            last_tile_dim_replicate,
        } = &self.sharding
        else {
            // Replicated: tiles_per_dim accepts no other sharding.
            return Sharding::Replicated;
        };
        debug_assert_eq!(
            dims.iter().product::<usize>(),
            self.tiles.iter().product::<usize>()
        );
        let mut t: Vec<i64> = dims.iter().map(|&d| d as i64).collect();
        if *last_tile_dim_replicate {
            t.push(*tile_assignment_dims.last().expect("a replication dim"));
        }
        Sharding::Tiled {
            tile_assignment_dims: t,
            devices: devices.clone(),
            last_tile_dim_replicate: *last_tile_dim_replicate,
        }
    }

    /// The device's piece of the parameter `p`, whose dims are cut as `p_tiles` (the operand's
    /// trailing dims' tiles for a norm scale, all 1 for a table every piece reads whole): `p`
    /// broadcast to `[G, p...]`, cut over G (and `p_tiles`), and the device's row reshaped to
    /// the piece's dims. Call outside the manual scope; the reshape is made `{manual}`. Its
    /// gradient is summed over the row pieces by the broadcast's transpose.
    pub(crate) fn param_piece(&self, b: &Builder, p: Op, p_tiles: &[usize]) -> Result<Op> {
        let pd = b.shape(p)?.dims().to_vec();
        let mut full = vec![self.pieces() as i64];
        full.extend(&pd);
        let dims: Vec<i64> = (1..=pd.len() as i64).collect();
        let stacked = b.broadcast_in_dim(p, &full, &dims)?;
        let piece = b.full_to_shard(stacked, self.stacked(p_tiles))?;
        let local: Vec<i64> = pd
            .iter()
            .zip(p_tiles)
            .map(|(&d, &t)| d / t as i64)
            .collect();
        let _m = b.manual_scope();
        b.reshape(piece, &local)
    }

    /// The sum over the devices' row pieces of a per-piece scalar `s` (made in the manual
    /// scope): each device's `[1]`, a `[G]` value cut over G, reduced outside the region.
    pub(crate) fn sum_scalar(&self, b: &Builder, s: Op) -> Result<Op> {
        let one = {
            let _m = b.manual_scope();
            b.reshape(s, &[1])?
        };
        let all = b.shard_to_full(one, self.stacked(&[]), &[self.pieces() as i64])?;
        b.reduce_sum(all, &[0])
    }
}
