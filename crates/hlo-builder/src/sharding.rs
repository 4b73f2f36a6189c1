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
            (Sharding::Replicated, _) => Ok(()),
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
        }
    }
}
