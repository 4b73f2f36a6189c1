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
//! (`custom_call_row_major`), as the kernel indexes them. Each updated parameter and moment
//! aliases its operand (`output_operand_aliasing`), so the update runs in place
//! ([`adamw_in_place`]) and XLA keeps one copy of the optimizer state rather than two.
//!
//! The custom call is for one CPU device: XLA's SPMD partitioner would replicate its operands.
//! The element-wise HLO stays the lowering for other platforms and for sharded meshes.

use crate::kernel::adamw::{adamw_in_place, AdamwHyper, AdamwInPlace, AdamwStep};
use hlo_builder::{Attr, Builder, ElementType, Op, Result, Shape};
use pjrt::ffi::{CallFrame, FfiError};

/// Custom-call target of the update.
pub const ADAMW_TARGET: &str = "rattention.adamw";

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
    let n = params.len();
    if [grads.len(), m.len(), v.len(), decay.len()] != [n; 4] {
        return Err(b.error(
            "adamw_call",
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
        for (what, op) in [("gradient", grads[i]), ("m", m[i]), ("v", v[i])] {
            let t = b.shape(op)?;
            if t != s || s.ty() != Some(ElementType::F32) {
                return Err(b.error(
                    "adamw_call",
                    format!(
                        "parameter {i}: parameter {s} and its {what} {t} must be one f32 shape"
                    ),
                ));
            }
        }
        shapes.push(s);
    }
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
    let attrs = [
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
    ];
    // p'_i, m'_i, v'_i live in the buffers of p_i, m_i, v_i (operands 1 + i, 1 + 2n + i,
    // 1 + 3n + i; the gradients are operands 1 + n + i).
    let aliases: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| {
            [
                (i, 1 + i),
                (n + i, 1 + 2 * n + i),
                (2 * n + i, 1 + 3 * n + i),
            ]
        })
        .collect();
    let call =
        b.custom_call_in_place(ADAMW_TARGET, &operands, Shape::tuple(out), &attrs, &aliases)?;
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

fn adamw_handler(frame: &mut CallFrame<'_>) -> std::result::Result<(), FfiError> {
    let h = AdamwHyper {
        beta1: f32_attr(frame, "beta1")?,
        one_minus_beta1: f32_attr(frame, "one_minus_beta1")?,
        beta2: f32_attr(frame, "beta2")?,
        one_minus_beta2: f32_attr(frame, "one_minus_beta2")?,
        eps: f32_attr(frame, "eps")?,
        weight_decay: f32_attr(frame, "weight_decay")?,
        clip_norm: f32_attr(frame, "clip_norm")?,
    };
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

/// Registers the update's CPU handler for `client`'s platform (called by
/// [`crate::register_cpu_kernels`]).
pub fn register_cpu_kernel(client: &pjrt::Client) -> pjrt::Result<()> {
    client.register_ffi_handler(ADAMW_TARGET, ADAMW_HANDLER)
}
