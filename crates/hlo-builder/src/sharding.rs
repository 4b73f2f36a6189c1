//! GSPMD sharding annotations (`OpSharding`), for SPMD partitioning by XLA.

use crate::proto;
use crate::shape::{Shape, ShapeError};

/// How a value is laid out across devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sharding {
    /// A full copy on every device: `{replicated}`.
    Replicated,
    /// The whole value on one device: `{maximal device=N}`.
    Maximal {
        /// The device.
        device: i64,
    },
    /// Split into tiles: dimension `i` is cut into `tile_assignment_dims[i]` pieces; tile
    /// `(i0, i1, ...)` lives on `devices[row-major index]`. With `last_tile_dim_replicate`, the
    /// assignment has one extra trailing dimension over which tiles are replicated:
    /// `{devices=[2,1,2]0,1,2,3 last_tile_dim_replicate}`.
    Tiled {
        /// Number of tiles per dimension (+1 trailing replication dim if `last_tile_dim_replicate`).
        tile_assignment_dims: Vec<i64>,
        /// Device of each tile, row-major over `tile_assignment_dims`.
        devices: Vec<i64>,
        /// Whether the last tile dimension is a replication dimension.
        last_tile_dim_replicate: bool,
    },
    /// One sharding per tuple element.
    Tuple(Vec<Sharding>),
    /// Inside a manually partitioned region (`shard_map`): the value already is one device's
    /// piece and the partitioner leaves it alone: `{manual}`. Made by
    /// [`Builder::full_to_shard`](crate::Builder::full_to_shard).
    Manual,
}

impl Sharding {
    /// Tiled over `tile_assignment_dims` with devices `0..n` in order.
    pub fn tiled(tile_assignment_dims: &[i64]) -> Sharding {
        let n: i64 = tile_assignment_dims.iter().product();
        Sharding::Tiled {
            tile_assignment_dims: tile_assignment_dims.to_vec(),
            devices: (0..n).collect(),
            last_tile_dim_replicate: false,
        }
    }

    /// Check the sharding against the shape of the value it annotates.
    pub fn validate(&self, shape: &Shape) -> Result<(), ShapeError> {
        const OP: &str = "set_sharding";
        match (self, shape) {
            (Sharding::Replicated | Sharding::Manual, _) => Ok(()),
            (Sharding::Maximal { device }, _) if *device >= 0 => Ok(()),
            (Sharding::Maximal { device }, _) => Err(ShapeError::new(
                OP,
                format!("maximal device {device} is negative"),
            )),
            (Sharding::Tuple(elems), Shape::Tuple(shapes)) => {
                if elems.len() != shapes.len() {
                    return Err(ShapeError::new(
                        OP,
                        format!(
                            "tuple sharding has {} elements but the value {} has {}",
                            elems.len(),
                            shape.short(),
                            shapes.len()
                        ),
                    ));
                }
                elems
                    .iter()
                    .zip(shapes)
                    .try_for_each(|(e, s)| e.validate(s))
            }
            (Sharding::Tuple(_), _) => Err(ShapeError::new(
                OP,
                format!("tuple sharding on array {}", shape.short()),
            )),
            (Sharding::Tiled { .. }, Shape::Tuple(_)) => Err(ShapeError::new(
                OP,
                format!(
                    "tiled sharding on tuple {}; use Sharding::Tuple",
                    shape.short()
                ),
            )),
            (
                Sharding::Tiled {
                    tile_assignment_dims,
                    devices,
                    last_tile_dim_replicate,
                },
                Shape::Array { dims, .. },
            ) => {
                let want = dims.len() + usize::from(*last_tile_dim_replicate);
                if tile_assignment_dims.len() != want {
                    return Err(ShapeError::new(
                        OP,
                        format!(
                            "tile assignment dims {:?} have rank {} but the value {} needs {}",
                            tile_assignment_dims,
                            tile_assignment_dims.len(),
                            shape.short(),
                            want
                        ),
                    ));
                }
                if tile_assignment_dims.iter().any(|&d| d < 1) {
                    return Err(ShapeError::new(
                        OP,
                        format!("tile assignment dims {tile_assignment_dims:?} must be >= 1"),
                    ));
                }
                let n: i64 = tile_assignment_dims.iter().product();
                if n as usize != devices.len() {
                    return Err(ShapeError::new(OP, format!("tile assignment dims {tile_assignment_dims:?} need {n} devices, got {}", devices.len())));
                }
                let mut sorted = devices.clone();
                sorted.sort_unstable();
                sorted.dedup();
                if sorted.len() != devices.len() || sorted.first().is_some_and(|&d| d < 0) {
                    return Err(ShapeError::new(
                        OP,
                        format!("devices {devices:?} must be distinct and non-negative"),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The `OpSharding` proto.
    pub fn to_proto(&self) -> proto::OpSharding {
        match self {
            Sharding::Replicated => proto::OpSharding {
                r#type: 0,
                ..Default::default()
            },
            Sharding::Maximal { device } => proto::OpSharding {
                r#type: 1,
                tile_assignment_dimensions: vec![1],
                tile_assignment_devices: vec![*device],
                ..Default::default()
            },
            Sharding::Tuple(e) => proto::OpSharding {
                r#type: 2,
                tuple_shardings: e.iter().map(Sharding::to_proto).collect(),
                ..Default::default()
            },
            Sharding::Tiled {
                tile_assignment_dims,
                devices,
                last_tile_dim_replicate,
            } => proto::OpSharding {
                r#type: 3,
                tile_assignment_dimensions: tile_assignment_dims.clone(),
                tile_assignment_devices: devices.clone(),
                replicate_on_last_tile_dim: *last_tile_dim_replicate,
                ..Default::default()
            },
            Sharding::Manual => proto::OpSharding {
                r#type: 4,
                ..Default::default()
            },
        }
    }

    /// The same sharding on every array of `shape`: itself for an array, a
    /// [`Sharding::Tuple`] of it (nested like the shape) for a tuple.
    pub fn for_shape(&self, shape: &Shape) -> Sharding {
        match shape {
            Shape::Tuple(elems) => {
                Sharding::Tuple(elems.iter().map(|e| self.for_shape(e)).collect())
            }
            Shape::Array { .. } => self.clone(),
        }
    }

    /// Pieces per dimension of an array of rank `rank` (1 where the dim is not cut), or an error
    /// for a sharding without tiles per dimension (maximal, tuple, manual).
    pub fn tiles_per_dim(&self, rank: usize) -> Result<Vec<usize>, ShapeError> {
        match self {
            Sharding::Replicated => Ok(vec![1; rank]),
            Sharding::Tiled {
                tile_assignment_dims,
                last_tile_dim_replicate,
                ..
            } => {
                let n = tile_assignment_dims
                    .len()
                    .saturating_sub(usize::from(*last_tile_dim_replicate));
                if n != rank {
                    return Err(ShapeError::new(
                        "sharding",
                        format!(
                            "tile assignment dims {tile_assignment_dims:?} do not fit a rank-{rank} array"
                        ),
                    ));
                }
                Ok(tile_assignment_dims[..n]
                    .iter()
                    .map(|&t| t as usize)
                    .collect())
            }
            other => Err(ShapeError::new(
                "sharding",
                format!("{other:?} has no tiles per dimension"),
            )),
        }
    }

    /// One device's piece of an array of `dims` under this sharding: the dims divided by their
    /// tiles, or an error naming the dim that does not divide.
    pub fn shard_dims(&self, dims: &[usize]) -> Result<Vec<usize>, ShapeError> {
        let tiles = self.tiles_per_dim(dims.len())?;
        dims.iter()
            .zip(&tiles)
            .enumerate()
            .map(|(i, (&d, &t))| {
                if d % t == 0 {
                    Ok(d / t)
                } else {
                    Err(ShapeError::new(
                        "sharding",
                        format!(
                            "dim {i} of size {d} does not split into {t} tiles (dims {dims:?})"
                        ),
                    ))
                }
            })
            .collect()
    }

    /// Where device `device` holds its piece of an array of `dims`: the offset of its tile in
    /// each dim (the shape is [`Sharding::shard_dims`]). `None` when the device holds no tile.
    /// A replicated value is at offset 0 everywhere.
    pub fn tile_offset(
        &self,
        device: i64,
        dims: &[usize],
    ) -> Result<Option<Vec<usize>>, ShapeError> {
        let shard = self.shard_dims(dims)?;
        let Sharding::Tiled {
            tile_assignment_dims,
            devices,
            ..
        } = self
        else {
            return Ok(Some(vec![0; dims.len()]));
        };
        let Some(pos) = devices.iter().position(|&d| d == device) else {
            return Ok(None);
        };
        // Row-major coordinates of `pos` over the tile assignment (the trailing replication dim,
        // if any, is dropped).
        let mut coords = vec![0usize; tile_assignment_dims.len()];
        let mut rest = pos;
        for (c, &t) in coords.iter_mut().zip(tile_assignment_dims).rev() {
            *c = rest % t as usize;
            rest /= t as usize;
        }
        Ok(Some(
            shard.iter().zip(&coords).map(|(&s, &c)| s * c).collect(),
        ))
    }

    /// The devices that hold the pieces of one line of tiles along `dim` of a rank-`rank`
    /// array: one group per position of the other tile coordinates (the replication one
    /// included), each ordered by the tile index along `dim`. These are the replica groups of a
    /// collective over the mesh axis that cuts `dim` (global device ids); device `group[i]`
    /// holds piece `i`. A value not cut along `dim` gives groups of one device.
    pub fn groups_along(&self, dim: usize, rank: usize) -> Result<Vec<Vec<i64>>, ShapeError> {
        let tiles = self.tiles_per_dim(rank)?;
        if dim >= rank {
            return Err(ShapeError::new(
                "groups_along",
                format!("dim {dim} out of range for rank {rank}"),
            ));
        }
        let Sharding::Tiled {
            tile_assignment_dims: t,
            devices,
            ..
        } = self
        else {
            return Ok(vec![vec![0]]);
        };
        // Row-major over the tile assignment: `dim` has stride `inner`.
        let inner: usize = t[dim + 1..].iter().map(|&x| x as usize).product();
        let n = tiles[dim];
        let mut groups = Vec::new();
        for start in 0..devices.len() {
            if !(start / inner).is_multiple_of(n) {
                continue;
            }
            groups.push((0..n).map(|i| devices[start + i * inner]).collect());
        }
        Ok(groups)
    }

    /// Split a row-major host array of `dims` into the pieces of `devices` `0..n` (each piece
    /// row-major, [`Sharding::shard_dims`] shaped). Errors when a device holds no piece.
    pub fn split_host<T: Copy>(
        &self,
        data: &[T],
        dims: &[usize],
        n: usize,
    ) -> Result<Vec<Vec<T>>, ShapeError> {
        let numel: usize = dims.iter().product();
        if data.len() != numel {
            return Err(ShapeError::new(
                "split_host",
                format!("{} values for dims {dims:?} ({numel})", data.len()),
            ));
        }
        let shard = self.shard_dims(dims)?;
        (0..n as i64)
            .map(|d| {
                let off = self.tile_offset(d, dims)?.ok_or_else(|| {
                    ShapeError::new(
                        "split_host",
                        format!("device {d} holds no tile of {self:?}"),
                    )
                })?;
                let mut out = Vec::with_capacity(shard.iter().product());
                for_each_row(dims, &shard, &off, |start, len| {
                    out.extend_from_slice(&data[start..start + len])
                });
                Ok(out)
            })
            .collect()
    }

    /// The inverse of [`Sharding::split_host`]: assemble a row-major array of `dims` from the
    /// pieces of devices `0..pieces.len()` (replicated pieces are read once, from the first
    /// device holding them).
    pub fn assemble_host<T: Copy + Default>(
        &self,
        pieces: &[Vec<T>],
        dims: &[usize],
    ) -> Result<Vec<T>, ShapeError> {
        let shard = self.shard_dims(dims)?;
        let per: usize = shard.iter().product();
        let mut out = vec![T::default(); dims.iter().product()];
        for (d, piece) in pieces.iter().enumerate() {
            if piece.len() != per {
                return Err(ShapeError::new(
                    "assemble_host",
                    format!(
                        "device {d} has {} values, its piece {shard:?} needs {per}",
                        piece.len()
                    ),
                ));
            }
            let Some(off) = self.tile_offset(d as i64, dims)? else {
                continue;
            };
            let mut at = 0;
            for_each_row(dims, &shard, &off, |start, len| {
                out[start..start + len].copy_from_slice(&piece[at..at + len]);
                at += len;
            });
        }
        Ok(out)
    }
}

/// Calls `f(start, len)` for every contiguous run (a row of the last dim) of the block of shape
/// `block` at `offset` inside a row-major array of `dims`, in row-major order of the block.
fn for_each_row(
    dims: &[usize],
    block: &[usize],
    offset: &[usize],
    mut f: impl FnMut(usize, usize),
) {
    let rank = dims.len();
    if rank == 0 {
        f(0, 1);
        return;
    }
    if block.contains(&0) {
        return;
    }
    let mut strides = vec![1usize; rank];
    for i in (0..rank - 1).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    let rows: usize = block[..rank - 1].iter().product();
    let mut idx = vec![0usize; rank - 1];
    for _ in 0..rows {
        let start: usize = (0..rank - 1)
            .map(|i| (offset[i] + idx[i]) * strides[i])
            .sum::<usize>()
            + offset[rank - 1];
        f(start, block[rank - 1]);
        for i in (0..rank - 1).rev() {
            idx[i] += 1;
            if idx[i] < block[i] {
                break;
            }
            idx[i] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_assemble_follow_the_tile_assignment() {
        // [4, 6] cut 2 × 3 over devices listed out of order: tile (i, j) is on devices[3i + j].
        let s = Sharding::Tiled {
            tile_assignment_dims: vec![2, 3],
            devices: vec![5, 4, 3, 2, 1, 0],
            last_tile_dim_replicate: false,
        };
        let dims = [4, 6];
        let data: Vec<i32> = (0..24).collect();
        let pieces = s.split_host(&data, &dims, 6).unwrap();
        for (d, piece) in pieces.iter().enumerate() {
            let pos = 5 - d; // devices[pos] == d
            let (ti, tj) = (pos / 3, pos % 3);
            // Naive: element (r, c) of the piece is element (2 ti + r, 2 tj + c) of the whole.
            let want: Vec<i32> = (0..2)
                .flat_map(|r| (0..2).map(move |c| ((2 * ti + r) * 6 + 2 * tj + c) as i32))
                .collect();
            assert_eq!(piece, &want, "device {d}");
        }
        assert_eq!(s.assemble_host(&pieces, &dims).unwrap(), data);
        assert_eq!(s.tile_offset(7, &dims).unwrap(), None);
        assert!(
            s.split_host(&data, &dims, 7).is_err(),
            "device 6 holds nothing"
        );
    }

    #[test]
    fn groups_along_a_dim_follow_the_tile_assignment() {
        // [B, T, G, H] cut 2 × 2 × 1 × 1, replicated 2 ways (data 2 × seq 2 × tensor 2 with G
        // whole): devices in data, seq, tensor order.
        let s = Sharding::Tiled {
            tile_assignment_dims: vec![2, 2, 1, 1, 2],
            devices: (0..8).collect(),
            last_tile_dim_replicate: true,
        };
        assert_eq!(
            s.groups_along(1, 4).unwrap(),
            vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7]]
        );
        assert_eq!(
            s.groups_along(0, 4).unwrap(),
            vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]
        );
        assert_eq!(s.groups_along(2, 4).unwrap().len(), 8);
        assert_eq!(
            Sharding::Replicated.groups_along(1, 4).unwrap(),
            vec![vec![0]]
        );
    }

    #[test]
    fn replicated_tiles_and_scalars() {
        // [4] cut in 2, each half on two devices (last_tile_dim_replicate).
        let s = Sharding::Tiled {
            tile_assignment_dims: vec![2, 2],
            devices: vec![0, 1, 2, 3],
            last_tile_dim_replicate: true,
        };
        let pieces = s.split_host(&[1.0f32, 2.0, 3.0, 4.0], &[4], 4).unwrap();
        assert_eq!(
            pieces,
            vec![
                vec![1.0, 2.0],
                vec![1.0, 2.0],
                vec![3.0, 4.0],
                vec![3.0, 4.0]
            ]
        );
        assert_eq!(
            s.assemble_host(&pieces, &[4]).unwrap(),
            vec![1.0, 2.0, 3.0, 4.0]
        );
        let r = Sharding::Replicated;
        assert_eq!(
            r.split_host(&[7i32], &[], 2).unwrap(),
            vec![vec![7], vec![7]]
        );
        assert_eq!(r.shard_dims(&[3, 5]).unwrap(), vec![3, 5]);
        assert!(Sharding::Manual.shard_dims(&[2]).is_err());
    }
}
