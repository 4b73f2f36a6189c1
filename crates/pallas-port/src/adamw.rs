//! The train step's AdamW update (global-norm clipping included) as one typed-FFI custom call,
//! `rattention.adamw`, served by [`kernel::adamw`](crate::kernel::adamw) on the CPU.
//!
//! Operands: `schedule f32[3]` = `(lr, bc1, bc2)` computed in the graph (one array, so XLA
//! computes the three scalars in one fusion instead of compiling a kernel for each), then the
//! parameters, the gradients, the first and the second moments, `n` tensors each (f32, any shapes, the four of
//! a parameter alike). Results: a tuple of the updated parameters, first moments, second moments
//! (`n` each) and the global gradient norm before clipping (f32 scalar). Attributes (f32):
//! `beta1`, `one_minus_beta1`, `beta2`, `one_minus_beta2`, `eps`, `weight_decay`, `clip_norm`,
//! and `decay` (i64 array, one 0/1 per parameter). The operands are laid out row-major
//! (`custom_call`), as the kernel indexes them. Each updated parameter and moment
//! aliases its operand (`output_operand_aliasing`), so the update runs in place
//! ([`adamw_in_place`]) and XLA keeps one copy of the optimizer state rather than two.
//!
//! The custom call is for one CPU device: XLA's SPMD partitioner would replicate its operands.
//! On a CPU mesh, [`adamw_sharded`] runs the update in a manually partitioned region instead:
//! `rattention.adamw_sumsq` (each device's per-tensor Σ g² of its pieces, f64), an all-gather of
//! those partials, their sum over the devices that own a distinct piece of each tensor (a
//! constant 0/1 mask: a replicated piece counts once), and `rattention.adamw_scaled` (the
//! clipped update of each device's pieces in place, given that global norm).

use crate::kernel::adamw::{
    adamw_in_place, adamw_in_place_with_norm, grad_sum_squares_shared, AdamwHyper, AdamwInPlace,
    AdamwStep,
};
use hlo_builder::{Attr, Builder, ElementType, Op, Result, Shape, Sharding};
use pjrt::ffi::{CallFrame, FfiError};

/// Custom-call target of the update.
pub const ADAMW_TARGET: &str = "rattention.adamw";

/// Custom-call target of the per-tensor gradient sums of squares (sharded update, step 1):
/// operands `s32[n]` (this device's copy index of each tensor's piece), then the `n`
/// gradients (f32); attribute `copies` (i64 array: how many devices hold each piece); result
/// `f64[n]`, each the sum over this copy's share of its piece.
pub const ADAMW_SUMSQ_TARGET: &str = "rattention.adamw_sumsq";

/// Custom-call target of the clipped update given the global norm (sharded update, step 3):
/// operands `schedule f32[3]`, `gnorm f32[]`, then the parameters, gradients, first and second
/// moments; results the updated parameters and moments (in place), no norm.
pub const ADAMW_SCALED_TARGET: &str = "rattention.adamw_scaled";

/// The updated state and the norm, as graph ops.
#[derive(Debug, Clone)]
pub struct AdamwOutputs {
    /// Updated parameters.
    pub params: Vec<Op>,
    /// Updated first moments.
    pub m: Vec<Op>,
    /// Updated second moments.
    pub v: Vec<Op>,
    /// Global gradient norm before clipping, `f32[]`.
    pub grad_norm: Op,
}

/// Adds the `rattention.adamw` custom call: `(lr, bc1, bc2)` scalars from the graph, then per
/// parameter its value, gradient and both moments, and whether it decays. Errors name the
/// parameter whose four tensors differ in shape.
#[allow(clippy::too_many_arguments)]
pub fn adamw_call(
    b: &Builder,
    h: &AdamwHyper,
    (lr, bc1, bc2): (Op, Op, Op),
    params: &[Op],
    grads: &[Op],
    m: &[Op],
    v: &[Op],
    decay: &[bool],
) -> Result<AdamwOutputs> {
    let shapes = check_operands(b, "adamw_call", params, grads, m, v, decay)?;
    let n = params.len();
    let out: Vec<Shape> = (0..3)
        .flat_map(|_| shapes.iter().cloned())
        .chain([Shape::scalar(ElementType::F32)])
        .collect();
    let one = |x: Op| b.reshape(x, &[1]);
    let schedule = b.concatenate(&[one(lr)?, one(bc1)?, one(bc2)?], 0)?;
    let operands: Vec<Op> = [schedule]
        .into_iter()
        .chain(params.iter().copied())
        .chain(grads.iter().copied())
        .chain(m.iter().copied())
        .chain(v.iter().copied())
        .collect();
    let attrs = hyper_attrs(h, decay);
    let call = b.custom_call_in_place(
        ADAMW_TARGET,
        &operands,
        Shape::tuple(out),
        &attrs,
        &state_aliases(n, 1),
    )?;
    let part = |k: usize| -> Result<Vec<Op>> {
        (0..n)
            .map(|i| b.get_tuple_element(call, k * n + i))
            .collect()
    };
    Ok(AdamwOutputs {
        params: part(0)?,
        m: part(1)?,
        v: part(2)?,
        grad_norm: b.get_tuple_element(call, 3 * n)?,
    })
}

/// p'_i, m'_i, v'_i live in the buffers of p_i, m_i, v_i: with `lead` operands before the
/// parameters, those are operands lead + i, lead + 2n + i, lead + 3n + i (the gradients are
/// lead + n + i).
fn state_aliases(n: usize, lead: usize) -> Vec<(usize, usize)> {
    (0..n)
        .flat_map(|i| {
            [
                (i, lead + i),
                (n + i, lead + 2 * n + i),
                (2 * n + i, lead + 3 * n + i),
            ]
        })
        .collect()
}

/// The custom calls' attributes: the constants and one decay flag per parameter.
fn hyper_attrs<'a>(h: &AdamwHyper, decay: &[bool]) -> [(&'a str, Attr); 8] {
    [
        ("beta1", Attr::F32(h.beta1)),
        ("beta2", Attr::F32(h.beta2)),
        ("clip_norm", Attr::F32(h.clip_norm)),
        (
            "decay",
            Attr::I64Array(decay.iter().map(|&d| d as i64).collect()),
        ),
        ("eps", Attr::F32(h.eps)),
        ("one_minus_beta1", Attr::F32(h.one_minus_beta1)),
        ("one_minus_beta2", Attr::F32(h.one_minus_beta2)),
        ("weight_decay", Attr::F32(h.weight_decay)),
    ]
}

/// Checks that there is one gradient, two moments and a decay flag per parameter, each of the
/// parameter's f32 shape; returns the parameters' shapes. Errors name `op` and the parameter.
fn check_operands(
    b: &Builder,
    op: &'static str,
    params: &[Op],
    grads: &[Op],
    m: &[Op],
    v: &[Op],
    decay: &[bool],
) -> Result<Vec<Shape>> {
    let n = params.len();
    if [grads.len(), m.len(), v.len(), decay.len()] != [n; 4] {
        return Err(b.error(
            op,
            format!(
                "{n} parameters but {} gradients, {} first moments, {} second moments, {} decay flags",
                grads.len(),
                m.len(),
                v.len(),
                decay.len()
            ),
        ));
    }
    let mut shapes = Vec::with_capacity(3 * n + 1);
    for i in 0..n {
        let s = b.shape(params[i])?;
        for (what, x) in [("gradient", grads[i]), ("m", m[i]), ("v", v[i])] {
            let t = b.shape(x)?;
            if t != s || s.ty() != Some(ElementType::F32) {
                return Err(b.error(
                    op,
                    format!(
                        "parameter {i}: parameter {s} and its {what} {t} must be one f32 shape"
                    ),
                ));
            }
        }
        shapes.push(s);
    }
    Ok(shapes)
}

/// Which copy device `device` holds of its piece of a tensor laid out by `sharding` over
/// `devices` devices, and how many devices hold that same piece: `(k, r)`. The `r` copies each
/// sum the squares of a different `1/r` of the piece
/// ([`replica_range`](crate::kernel::adamw::replica_range)), so every element counts once in
/// the global norm and no device repeats another's work. A replicated tensor has `r = devices`
/// and `k` = the device's id; a tiled one `r` = its trailing replication dim
/// (`last_tile_dim_replicate`, else 1) and `k` = the device's coordinate along it. `None` for
/// a device outside the tile assignment or a sharding without tiles (maximal, tuple, manual).
pub fn norm_share(sharding: &Sharding, device: i64, devices: usize) -> Option<(usize, usize)> {
    match sharding {
        Sharding::Tiled {
            tile_assignment_dims,
            devices: assigned,
            last_tile_dim_replicate,
        } => {
            let pos = assigned.iter().position(|&d| d == device)?;
            let r = match (last_tile_dim_replicate, tile_assignment_dims.last()) {
                (true, Some(&r)) => r.max(1) as usize,
                _ => 1,
            };
            Some((pos % r, r))
        }
        Sharding::Replicated if (0..devices as i64).contains(&device) => {
            Some((device as usize, devices))
        }
        _ => None,
    }
}

/// AdamW with global-norm clipping over a mesh of `devices` devices, in one manually
/// partitioned region: every parameter, gradient and moment enters as its device's piece under
/// `shardings[i]` (the moments' layout: the parameter's own, or under ZeRO-1 a finer one, in
/// which case the partitioner slices the parameter and gradient to it and the caller's result
/// shardings gather the updated parameter back), each device
///
/// 1. sums the squares of its share of its pieces per tensor (`rattention.adamw_sumsq`, f64;
///    a piece held by `r` devices is split among them, [`norm_share`], so each element of each
///    tensor is counted exactly once),
/// 2. all-gathers those partials (`f64[devices, n]`) and adds them all, giving
///    `‖g‖ = √(f32(Σ))` as on one device up to the order of the f64 additions,
/// 3. updates its pieces in place, clipped by that norm (`rattention.adamw_scaled`),
/// 4. where a parameter's own layout `param_shardings[i]` is coarser than `shardings[i]`
///    (ZeRO-1), gathers the updated slices back into its parameter piece: every such slice
///    that one dim cuts finer is flattened into one buffer per set of replica groups, and one
///    `all-gather` moves them all ([`GatherPlan`]), instead of one collective per tensor.
///
/// Returns the full updated parameters (laid out by `param_shardings`), the moments (laid out by
/// `shardings`) and the replicated norm. The arithmetic per element is [`adamw_call`]'s. Errors
/// name the parameter whose tensors differ in shape or whose sharding does not divide it.
#[allow(clippy::too_many_arguments)]
pub fn adamw_sharded(
    b: &Builder,
    h: &AdamwHyper,
    (lr, bc1, bc2): (Op, Op, Op),
    (params, grads, m, v): (&[Op], &[Op], &[Op], &[Op]),
    decay: &[bool],
    (param_shardings, shardings): (&[Sharding], &[Sharding]),
    devices: usize,
) -> Result<AdamwOutputs> {
    let full = check_operands(b, "adamw_sharded", params, grads, m, v, decay)?;
    let n = params.len();
    if shardings.len() != n || param_shardings.len() != n || devices == 0 {
        return Err(b.error(
            "adamw_sharded",
            format!(
                "{n} parameters but {} parameter and {} moment shardings, over {devices} devices",
                param_shardings.len(),
                shardings.len()
            ),
        ));
    }
    let plans: Vec<Option<GatherPlan>> = (0..n)
        .map(|i| {
            let dims: Vec<usize> = full[i].dims().iter().map(|&d| d as usize).collect();
            GatherPlan::new(&param_shardings[i], &shardings[i], &dims, devices)
        })
        .collect();
    let one = |x: Op| b.reshape(x, &[1]);
    let schedule = b.concatenate(&[one(lr)?, one(bc1)?, one(bc2)?], 0)?;
    let schedule = b.full_to_shard(schedule, Sharding::Replicated)?;
    let pieces = |xs: &[Op]| -> Result<Vec<Op>> {
        xs.iter()
            .zip(shardings)
            .map(|(&x, s)| b.full_to_shard(x, s.clone()))
            .collect()
    };
    let (pl, gl, ml, vl) = (pieces(params)?, pieces(grads)?, pieces(m)?, pieces(v)?);
    // Device d's copy index of tensor i, row-major [devices, n]; the copy counts per tensor.
    let mut copy = Vec::with_capacity(devices * n);
    let mut copies = vec![0i64; n];
    for d in 0..devices as i64 {
        for (i, s) in shardings.iter().enumerate() {
            let Some((k, r)) = norm_share(s, d, devices) else {
                return Err(b.error(
                    "adamw_sharded",
                    format!("parameter {i}: sharding {s:?} gives device {d} no tile"),
                ));
            };
            copy.push(k as i32);
            copies[i] = r as i64;
        }
    }
    let copy = b.constant_vec(copy, &[devices as i64, n as i64])?;
    // The device's own id, the shard_map way: its piece of iota(devices) cut in `devices`.
    let ids = b.iota(ElementType::S32, &[devices as i64], 0)?;
    let id = b.full_to_shard(ids, Sharding::tiled(&[devices as i64]))?;
    let copy = b.full_to_shard(copy, Sharding::Replicated)?;
    let (new, gnorm_piece) = {
        let _m = b.manual_scope();
        let id = b.reshape(id, &[])?;
        let row = b.dynamic_slice(copy, &[id, b.scalar(0i32)?], &[1, n as i64])?;
        let row = b.reshape(row, &[n as i64])?;
        let sum_operands: Vec<Op> = [row].into_iter().chain(gl.iter().copied()).collect();
        let sums = b.custom_call(
            ADAMW_SUMSQ_TARGET,
            &sum_operands,
            Shape::array(ElementType::F64, &[n as i64]),
            &[("copies", Attr::I64Array(copies))],
        )?;
        let all = b.all_gather(
            b.reshape(sums, &[1, n as i64])?,
            0,
            &[(0..devices as i64).collect()],
        )?;
        let total = b.reduce_sum(all, &[0, 1])?;
        let gnorm = b.sqrt(b.convert(total, ElementType::F32)?)?;
        let local: Vec<Shape> = pl.iter().map(|&x| b.shape(x)).collect::<Result<_>>()?;
        let out: Vec<Shape> = (0..3).flat_map(|_| local.iter().cloned()).collect();
        let operands: Vec<Op> = [schedule, gnorm]
            .into_iter()
            .chain(pl.iter().copied())
            .chain(gl.iter().copied())
            .chain(ml.iter().copied())
            .chain(vl.iter().copied())
            .collect();
        let call = b.custom_call_in_place(
            ADAMW_SCALED_TARGET,
            &operands,
            Shape::tuple(out),
            &hyper_attrs(h, decay),
            &state_aliases(n, 2),
        )?;
        let mut new: Vec<Op> = (0..3 * n)
            .map(|k| b.get_tuple_element(call, k))
            .collect::<Result<_>>()?;
        let gathered = gather_params(b, &new[..n], &plans)?;
        for (i, g) in gathered.into_iter().enumerate() {
            if let Some(g) = g {
                new[i] = g;
            }
        }
        (new, gnorm)
    };
    let back = |k: usize| -> Result<Vec<Op>> {
        (0..n)
            .map(|i| {
                // A gathered parameter is its own layout's piece now; any other keeps the
                // moments' (the partitioner reshards it, if it must).
                let s = match (k, &plans[i]) {
                    (0, Some(_)) => &param_shardings[i],
                    _ => &shardings[i],
                };
                b.shard_to_full(new[k * n + i], s.clone(), full[i].dims())
            })
            .collect()
    };
    Ok(AdamwOutputs {
        params: back(0)?,
        m: back(1)?,
        v: back(2)?,
        grad_norm: b.shard_to_full(gnorm_piece, Sharding::Replicated, &[])?,
    })
}

/// How one parameter's updated slice (under its moments' finer layout) becomes its parameter
/// piece again: the devices holding one parameter piece form a replica group, ordered by where
/// their slices lie along the one dim `dim` the moments cut finer (into `copies` slices), so an
/// `all-gather` along that dim within the groups rebuilds the piece. `None` from [`GatherPlan::new`]
/// when the layouts are equal (nothing to gather) or differ in more than one dim or not as
/// contiguous slices (the partitioner's resharding then does it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatherPlan {
    /// The dim the slices are cut along.
    pub dim: usize,
    /// Slices per parameter piece (the group size).
    pub copies: usize,
    /// The replica groups (device ids), each in slice order, sorted by their first device.
    pub groups: Vec<Vec<i64>>,
    /// The slice's shape (the moments' shard shape).
    pub slice: Vec<usize>,
}

impl GatherPlan {
    /// The plan for a tensor of `dims` whose parameter is laid out by `param` and whose
    /// moments (and updated slices) by `moment`, over `devices` devices.
    pub fn new(
        param: &Sharding,
        moment: &Sharding,
        dims: &[usize],
        devices: usize,
    ) -> Option<GatherPlan> {
        if param == moment {
            return None;
        }
        let pp = param.shard_dims(dims).ok()?;
        let pm = moment.shard_dims(dims).ok()?;
        let cut: Vec<usize> = (0..dims.len()).filter(|&k| pp[k] != pm[k]).collect();
        let &[dim] = cut.as_slice() else {
            return None;
        };
        let copies = pp[dim] / pm[dim];
        let mut groups: std::collections::BTreeMap<Vec<usize>, Vec<(usize, i64)>> =
            Default::default();
        for d in 0..devices as i64 {
            let tp = param.tile_offset(d, dims).ok()??;
            let tm = moment.tile_offset(d, dims).ok()??;
            for k in 0..dims.len() {
                let inside = tm[k] >= tp[k] && tm[k] + pm[k] <= tp[k] + pp[k];
                if !inside || (k != dim && tm[k] != tp[k]) {
                    return None;
                }
            }
            groups
                .entry(tp.clone())
                .or_default()
                .push((tm[dim] - tp[dim], d));
        }
        let mut out = Vec::new();
        for (_, mut g) in groups {
            g.sort();
            // The devices holding each of the `copies` slices of the piece, as many at each
            // (the moments may be replicated over an axis that fits no dim): group q takes
            // the q-th holder of every slice.
            let holders = g.len() / copies;
            if holders * copies != g.len() {
                return None;
            }
            for (j, chunk) in g.chunks(holders).enumerate() {
                if chunk.iter().any(|&(o, _)| o != j * pm[dim]) {
                    return None;
                }
            }
            for q in 0..holders {
                out.push(
                    (0..copies)
                        .map(|j| g[j * holders + q].1)
                        .collect::<Vec<i64>>(),
                );
            }
        }
        out.sort();
        Some(GatherPlan {
            dim,
            copies,
            groups: out,
            slice: pm,
        })
    }
}

/// Inside the manual region: the parameter pieces of the updated slices `new` (one per
/// parameter) whose [`GatherPlan`] is `Some`, all those with the same replica groups moved by
/// one `all-gather` of their flattened slices, then cut apart and put back in order along their
/// dim. `None` for the parameters without a plan.
fn gather_params(b: &Builder, new: &[Op], plans: &[Option<GatherPlan>]) -> Result<Vec<Option<Op>>> {
    let mut out: Vec<Option<Op>> = vec![None; new.len()];
    let mut buckets: std::collections::BTreeMap<&Vec<Vec<i64>>, Vec<usize>> = Default::default();
    for (i, p) in plans.iter().enumerate() {
        if let Some(p) = p {
            buckets.entry(&p.groups).or_default().push(i);
        }
    }
    for (groups, members) in buckets {
        let r = groups[0].len() as i64;
        let sizes: Vec<i64> = members
            .iter()
            .map(|&i| {
                plans[i]
                    .as_ref()
                    .map_or(0, |p| p.slice.iter().product::<usize>() as i64)
            })
            .collect();
        let flat: Vec<Op> = members
            .iter()
            .zip(&sizes)
            .map(|(&i, &len)| b.reshape(new[i], &[len]))
            .collect::<Result<_>>()?;
        let packed = if flat.len() == 1 {
            flat[0]
        } else {
            b.concatenate(&flat, 0)?
        };
        let total: i64 = sizes.iter().sum();
        let all = b.all_gather(packed, 0, groups)?;
        let all = b.reshape(all, &[r, total])?;
        let mut at = 0;
        for (&i, &len) in members.iter().zip(&sizes) {
            let p = plans[i].as_ref().expect("a member has a plan");
            let part = b.slice(all, &[0, at], &[r, at + len], &[1, 1])?;
            at += len;
            // [r, slice…] → [slice[..dim], r, slice[dim..]] → merge r into dim.
            let slice: Vec<i64> = p.slice.iter().map(|&d| d as i64).collect();
            let lead: Vec<i64> = [r].into_iter().chain(slice.iter().copied()).collect();
            let part = b.reshape(part, &lead)?;
            let rank = slice.len() as i64;
            let d = p.dim as i64;
            let perm: Vec<i64> = (1..=d).chain([0]).chain(d + 1..=rank).collect();
            let part = b.transpose(part, &perm)?;
            let mut piece = slice.clone();
            piece[p.dim] *= r;
            out[i] = Some(b.reshape(part, &piece)?);
        }
    }
    Ok(out)
}

fn f32_attr(frame: &CallFrame<'_>, name: &str) -> std::result::Result<f32, FfiError> {
    Ok(frame.attr_f64(name)? as f32)
}

/// The `(lr, bc1, bc2)` of operand 0 (`f32[3]`).
fn schedule(frame: &CallFrame<'_>) -> std::result::Result<AdamwStep, FfiError> {
    match frame.arg(0)?.as_slice::<f32>()? {
        &[lr, bc1, bc2] => Ok(AdamwStep { lr, bc1, bc2 }),
        s => Err(FfiError::invalid_argument(format!(
            "adamw: operand 0 (the schedule: lr, bc1, bc2) must be f32[3], got {} elements",
            s.len()
        ))),
    }
}

fn hyper(frame: &CallFrame<'_>) -> std::result::Result<AdamwHyper, FfiError> {
    Ok(AdamwHyper {
        beta1: f32_attr(frame, "beta1")?,
        one_minus_beta1: f32_attr(frame, "one_minus_beta1")?,
        beta2: f32_attr(frame, "beta2")?,
        one_minus_beta2: f32_attr(frame, "one_minus_beta2")?,
        eps: f32_attr(frame, "eps")?,
        weight_decay: f32_attr(frame, "weight_decay")?,
        clip_norm: f32_attr(frame, "clip_norm")?,
    })
}

/// The in-place tensors of an update whose parameters start at operand `lead` (see
/// [`state_aliases`]) and the decay flags give `n`; checks the operand and result counts.
fn in_place_tensors<'a>(
    frame: &mut CallFrame<'a>,
    lead: usize,
    rets: usize,
) -> std::result::Result<Vec<AdamwInPlace<'a>>, FfiError> {
    let decay = frame.attr_array_i64("decay")?;
    let n = decay.len();
    if frame.num_args() != lead + 4 * n || frame.num_rets() != 3 * n + rets {
        return Err(FfiError::invalid_argument(format!(
            "adamw: {n} decay flags need {} operands and {} results, got {} and {}",
            lead + 4 * n,
            3 * n + rets,
            frame.num_args(),
            frame.num_rets()
        )));
    }
    let g = (0..n)
        .map(|i| frame.arg(lead + n + i)?.as_slice::<f32>())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut tensors = Vec::with_capacity(n);
    for (i, g) in g.into_iter().enumerate() {
        tensors.push(AdamwInPlace {
            decay: decay[i] != 0,
            g,
            p: frame.in_place_mut::<f32>(lead + i, i)?,
            m: frame.in_place_mut::<f32>(lead + 2 * n + i, n + i)?,
            v: frame.in_place_mut::<f32>(lead + 3 * n + i, 2 * n + i)?,
        });
    }
    Ok(tensors)
}

fn adamw_handler(frame: &mut CallFrame<'_>) -> std::result::Result<(), FfiError> {
    let h = hyper(frame)?;
    let s = schedule(frame)?;
    let decay = frame.attr_array_i64("decay")?;
    let n = decay.len();
    if frame.num_args() != 1 + 4 * n || frame.num_rets() != 3 * n + 1 {
        return Err(FfiError::invalid_argument(format!(
            "adamw: {n} decay flags need {} operands and {} results, got {} and {}",
            1 + 4 * n,
            3 * n + 1,
            frame.num_args(),
            frame.num_rets()
        )));
    }
    let g = (0..n)
        .map(|i| frame.arg(1 + n + i)?.as_slice::<f32>())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut tensors = Vec::with_capacity(n);
    for (i, g) in g.into_iter().enumerate() {
        tensors.push(AdamwInPlace {
            decay: decay[i] != 0,
            g,
            p: frame.in_place_mut::<f32>(1 + i, i)?,
            m: frame.in_place_mut::<f32>(1 + 2 * n + i, n + i)?,
            v: frame.in_place_mut::<f32>(1 + 3 * n + i, 2 * n + i)?,
        });
    }
    let gnorm = adamw_in_place(&h, &s, &mut tensors).map_err(FfiError::invalid_argument)?;
    let mut norm = frame.ret(3 * n)?;
    match norm.as_mut_slice::<f32>()? {
        [x] => *x = gnorm,
        o => {
            return Err(FfiError::invalid_argument(format!(
                "adamw: the norm result must be an f32 scalar, got {} elements",
                o.len()
            )))
        }
    }
    Ok(())
}

pjrt::ffi_handler!(ADAMW_HANDLER, adamw_handler);

fn sumsq_handler(frame: &mut CallFrame<'_>) -> std::result::Result<(), FfiError> {
    let copies = frame.attr_array_i64("copies")?;
    let n = copies.len();
    if frame.num_args() != 1 + n {
        return Err(FfiError::invalid_argument(format!(
            "adamw_sumsq: {n} copy counts need {} operands (copy indices, then the gradients), \
             got {}",
            1 + n,
            frame.num_args()
        )));
    }
    let index = frame.arg(0)?.as_slice::<i32>()?;
    if index.len() != n {
        return Err(FfiError::invalid_argument(format!(
            "adamw_sumsq: operand 0 (copy indices) must be s32[{n}], got {} elements",
            index.len()
        )));
    }
    let shares: Vec<(usize, usize)> = index
        .iter()
        .zip(&copies)
        .map(|(&k, &r)| (k.max(0) as usize, r.max(1) as usize))
        .collect();
    let g = (0..n)
        .map(|i| frame.arg(1 + i)?.as_slice::<f32>())
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let sums = grad_sum_squares_shared(&g, &shares);
    let mut out = frame.ret(0)?;
    let out = out.as_mut_slice::<f64>()?;
    if out.len() != n {
        return Err(FfiError::invalid_argument(format!(
            "adamw_sumsq: {n} gradients need an f64[{n}] result, got {} elements",
            out.len()
        )));
    }
    out.copy_from_slice(&sums);
    Ok(())
}

pjrt::ffi_handler!(ADAMW_SUMSQ_HANDLER, sumsq_handler);

fn scaled_handler(frame: &mut CallFrame<'_>) -> std::result::Result<(), FfiError> {
    let h = hyper(frame)?;
    let s = schedule(frame)?;
    let gnorm = match frame.arg(1)?.as_slice::<f32>()? {
        &[x] => x,
        o => {
            return Err(FfiError::invalid_argument(format!(
                "adamw_scaled: operand 1 (the global norm) must be an f32 scalar, got {} elements",
                o.len()
            )))
        }
    };
    let mut tensors = in_place_tensors(frame, 2, 0)?;
    adamw_in_place_with_norm(&h, &s, gnorm, &mut tensors).map_err(FfiError::invalid_argument)
}

pjrt::ffi_handler!(ADAMW_SCALED_HANDLER, scaled_handler);

/// Registers the update's CPU handlers (the one-device `rattention.adamw` and the sharded
/// `rattention.adamw_sumsq` / `rattention.adamw_scaled`) for `client`'s platform (called by
/// [`crate::register_cpu_kernels`]).
pub fn register_cpu_kernel(client: &pjrt::Client) -> pjrt::Result<()> {
    client.register_ffi_handler(ADAMW_TARGET, ADAMW_HANDLER)?;
    client.register_ffi_handler(ADAMW_SUMSQ_TARGET, ADAMW_SUMSQ_HANDLER)?;
    client.register_ffi_handler(ADAMW_SCALED_TARGET, ADAMW_SCALED_HANDLER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_slice_is_gathered_along_its_one_finer_dim() {
        // A replicated [8, 4] parameter, moments in 4 row blocks: one group of all 4 devices.
        let rows = Sharding::tiled(&[4, 1]);
        let p = GatherPlan::new(&Sharding::Replicated, &rows, &[8, 4], 4).unwrap();
        assert_eq!((p.dim, p.copies, p.slice.clone()), (0, 4, vec![2, 4]));
        assert_eq!(p.groups, vec![vec![0, 1, 2, 3]]);
        // Parameter rows in 2 (devices 0,1 | 2,3 hold the halves), moments in 4: two groups.
        let halves = Sharding::Tiled {
            tile_assignment_dims: vec![2, 1, 2],
            devices: vec![0, 1, 2, 3],
            last_tile_dim_replicate: true,
        };
        let p = GatherPlan::new(&halves, &rows, &[8, 4], 4).unwrap();
        assert_eq!((p.dim, p.copies), (0, 2));
        assert_eq!(p.groups, vec![vec![0, 1], vec![2, 3]]);
        let cols = Sharding::Tiled {
            tile_assignment_dims: vec![1, 2, 2],
            devices: vec![3, 2, 1, 0],
            last_tile_dim_replicate: true,
        };
        // Moments cut along columns and replicated in pairs, listed backwards: each group
        // takes one holder of each column slice, in slice order.
        let p = GatherPlan::new(&Sharding::Replicated, &cols, &[8, 4], 4).unwrap();
        assert_eq!((p.dim, p.copies, p.slice.clone()), (1, 2, vec![8, 2]));
        assert_eq!(p.groups, vec![vec![2, 0], vec![3, 1]]);
        // Same layout: nothing to gather; finer in two dims: left to the partitioner.
        assert_eq!(GatherPlan::new(&rows, &rows, &[8, 4], 4), None);
        let both = Sharding::tiled(&[2, 2]);
        assert_eq!(
            GatherPlan::new(&Sharding::Replicated, &both, &[8, 4], 4),
            None
        );
    }

    #[test]
    fn each_piece_is_split_among_its_copies() {
        // [2, 1] tiles, each on 2 devices: devices 0,1 hold tile 0, devices 2,3 tile 1.
        let s = Sharding::Tiled {
            tile_assignment_dims: vec![2, 1, 2],
            devices: vec![0, 1, 2, 3],
            last_tile_dim_replicate: true,
        };
        let shares: Vec<_> = (0..4).map(|d| norm_share(&s, d, 4)).collect();
        assert_eq!(
            shares,
            [Some((0, 2)), Some((1, 2)), Some((0, 2)), Some((1, 2))]
        );
        let tiled = Sharding::tiled(&[4, 1]);
        assert!((0..4).all(|d| norm_share(&tiled, d, 4) == Some((0, 1))));
        let shares: Vec<_> = (0..4)
            .map(|d| norm_share(&Sharding::Replicated, d, 4))
            .collect();
        assert_eq!(
            shares,
            [Some((0, 4)), Some((1, 4)), Some((2, 4)), Some((3, 4))]
        );
        assert_eq!(norm_share(&Sharding::Maximal { device: 0 }, 0, 4), None);
        // Devices listed out of order: the copy index is the position in the assignment.
        let s = Sharding::Tiled {
            tile_assignment_dims: vec![1, 2],
            devices: vec![3, 1],
            last_tile_dim_replicate: true,
        };
        assert_eq!(norm_share(&s, 3, 4), Some((0, 2)));
        assert_eq!(norm_share(&s, 1, 4), Some((1, 2)));
        assert_eq!(norm_share(&s, 0, 4), None);
    }
}
