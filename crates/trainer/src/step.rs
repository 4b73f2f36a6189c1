//! The compiled train step: forward, loss, gradients (autodiff with RLA's custom VJP), global-norm
//! clipping, the learning-rate schedule and AdamW — one XLA program. Parameters and both Adam moments
//! stay on the device between steps; only the token batch crosses.
//!
//! The arguments and results are named by [`StepIo`]: the state (parameters, then both moments, a
//! tensor per parameter each) comes first in both, then `step` and `tokens` among the arguments and
//! `loss`, `grad_norm`, `lr` among the results. Each updated parameter and moment aliases its input
//! (`input_output_alias`), so a donating caller updates them in place. `weights` (one per target
//! token) choose which targets the loss scores: the recall task's answers, or every token of text.
//!
//! The optimizer (global-norm clipping and AdamW) is lowered as `[train] optimizer_lowering`
//! says ([`OptimizerLowering`]): element-wise HLO that XLA fuses and compiles, or on CPU devices
//! (the `auto` choice there) the CPU kernel ([`pallas_port::adamw`]), which leaves XLA no
//! optimizer kernels to compile: one `rattention.adamw` custom call on one device, a manual
//! region of per-device sums, an all-gather and per-device in-place updates on a mesh.

use crate::config::{OptimizerLowering, RunConfig, TrainConfig};
use hlo_builder::{Builder, Computation, ElementType, Op, Result, Shape, Sharding};
use model::{Mesh, MeshError, Model, ParamSharding, ParamSpec};
use std::ops::Range;

/// A group of the train state: a tensor per parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateGroup {
    /// The parameters.
    Params,
    /// Adam's first moments.
    AdamM,
    /// Adam's second moments.
    AdamV,
}

impl StateGroup {
    /// The groups in state order.
    pub const ALL: [StateGroup; 3] = [StateGroup::Params, StateGroup::AdamM, StateGroup::AdamV];

    /// The prefix of the group's tensors in checkpoints (and of the moments in the graph).
    pub fn prefix(self) -> &'static str {
        match self {
            StateGroup::Params => "params",
            StateGroup::AdamM => "adam_m",
            StateGroup::AdamV => "adam_v",
        }
    }
}

/// One tensor of the train state.
#[derive(Debug, Clone)]
pub struct StateTensor<'a> {
    /// Its group.
    pub group: StateGroup,
    /// Checkpoint name `{group}.{parameter}`, e.g. `adam_m.layers.0.attn.wq`.
    pub name: String,
    /// The parameter it belongs to (the tensor has its shape).
    pub spec: &'a ParamSpec,
}

/// The train state's tensors in order: every group of [`StateGroup::ALL`], a tensor per parameter.
pub fn state_tensors(specs: &[ParamSpec]) -> Vec<StateTensor<'_>> {
    StateGroup::ALL
        .into_iter()
        .flat_map(|group| {
            specs.iter().map(move |spec| StateTensor {
                group,
                name: format!("{}.{}", group.prefix(), spec.name),
                spec,
            })
        })
        .collect()
}

/// The sharding of every state tensor under `mesh`, in [`state_tensors`] order: the parameters'
/// ([`Model::param_shardings`]), then both Adam moments' ([`Model::moment_shardings`]: their
/// parameter's, or with `mesh.shard_optimizer` cut further over the axes the parameter is
/// replicated over).
pub fn state_shardings(
    model: &Model,
    mesh: &Mesh,
) -> std::result::Result<Vec<ParamSharding>, MeshError> {
    let params = model.param_shardings(mesh)?;
    let moments = model.moment_shardings(mesh)?;
    Ok(StateGroup::ALL
        .into_iter()
        .flat_map(|group| {
            let of = match group {
                StateGroup::Params => &params,
                StateGroup::AdamM | StateGroup::AdamV => &moments,
            };
            of.iter().map(move |p| ParamSharding {
                name: format!("{}.{}", group.prefix(), p.name),
                ..p.clone()
            })
        })
        .collect())
}

/// How the train step's arguments and results lie across the mesh's devices: the state
/// ([`state_shardings`]: the parameters by the rules, the moments like them or ZeRO-1), the token batch `[B, T+1]` cut by the `batch` rule,
/// `step` and the scalar results replicated. One owner for the graph's annotations and for the
/// host's uploads and downloads.
#[derive(Debug, Clone)]
pub struct StepShardings {
    /// Every state tensor, in [`state_tensors`] order.
    pub state: Vec<ParamSharding>,
    /// The token batch.
    pub tokens: Sharding,
}

impl StepShardings {
    /// The shardings of `cfg`'s train step on `mesh`; errors name the tensor that does not
    /// split (a parameter, or the token batch when B does not divide).
    pub fn new(
        cfg: &RunConfig,
        model: &Model,
        mesh: &Mesh,
    ) -> std::result::Result<Self, MeshError> {
        Ok(StepShardings {
            state: state_shardings(model, mesh)?,
            tokens: mesh.batch_sharding(
                "tokens (train.batch)",
                &[cfg.train.batch, cfg.model.seq_len + 1],
            )?,
        })
    }
}

/// Positions of the train state in the step's arguments or in its results: the same three
/// runs on both sides (each result aliases the argument at the same place in its run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSlots {
    /// Parameters, in [`Model::param_specs`] order.
    pub params: Range<usize>,
    /// Adam first moments, one per parameter.
    pub adam_m: Range<usize>,
    /// Adam second moments, one per parameter.
    pub adam_v: Range<usize>,
}

impl StateSlots {
    /// The three runs of `n` tensors each from position 0: parameters, first moments, second
    /// moments.
    fn first(n: usize) -> StateSlots {
        StateSlots {
            params: 0..n,
            adam_m: n..2 * n,
            adam_v: 2 * n..3 * n,
        }
    }

    /// Every position, in [`state_tensors`] order.
    fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        self.params
            .clone()
            .chain(self.adam_m.clone())
            .chain(self.adam_v.clone())
    }

    /// Tensors in the state (`3 × parameters`).
    fn len(&self) -> usize {
        self.params.len() + self.adam_m.len() + self.adam_v.len()
    }
}

/// Positions of the train step's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepArgs {
    /// The state: parameters and both Adam moments.
    pub state: StateSlots,
    /// The 0-based step, `f32[]`.
    pub step: usize,
    /// The token batch, `s32[B, T+1]`.
    pub tokens: usize,
    /// The loss weight of every target, `f32[B, T]`.
    pub weights: usize,
}

/// Positions of the train step's results (a flat tuple).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepResults {
    /// The updated state (aliasing [`StepArgs::state`]).
    pub state: StateSlots,
    /// Weighted mean loss of the batch (over the targets the weights score), `f32[]`.
    pub loss: usize,
    /// Global gradient norm before clipping, `f32[]`.
    pub grad_norm: usize,
    /// Learning rate of the step, `f32[]`.
    pub lr: usize,
}

/// The train step's signature: where each named input and output sits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepIo {
    /// Arguments.
    pub args: StepArgs,
    /// Results.
    pub results: StepResults,
}

/// The train step's results, by name.
#[derive(Debug)]
pub struct StepOutputs<T> {
    /// The updated state, in [`state_tensors`] order.
    pub state: Vec<T>,
    /// Mean loss.
    pub loss: T,
    /// Global gradient norm.
    pub grad_norm: T,
    /// Learning rate.
    pub lr: T,
}

impl StepIo {
    /// The signature of the train step of a model with `n_params` parameters.
    pub fn new(n_params: usize) -> StepIo {
        let n = n_params;
        StepIo {
            args: StepArgs {
                state: StateSlots::first(n),
                step: 3 * n,
                tokens: 3 * n + 1,
                weights: 3 * n + 2,
            },
            results: StepResults {
                state: StateSlots::first(n),
                loss: 3 * n,
                grad_norm: 3 * n + 1,
                lr: 3 * n + 2,
            },
        }
    }

    /// Tensors in the state (`3 × parameters`).
    pub fn state_len(&self) -> usize {
        self.args.state.len()
    }

    /// `(argument, result)` position of every state tensor, in [`state_tensors`] order: the
    /// step's input-output aliases.
    pub fn state_positions(&self) -> Vec<(usize, usize)> {
        self.args
            .state
            .positions()
            .zip(self.results.state.positions())
            .collect()
    }

    /// The argument list from the state (in [`state_tensors`] order), the step, the tokens and
    /// their loss weights.
    pub fn arguments<T>(&self, state: Vec<T>, step: T, tokens: T, weights: T) -> Vec<T> {
        assert_eq!(state.len(), self.state_len(), "train state size");
        let mut slots: Vec<Option<T>> = (0..self.state_len() + 3).map(|_| None).collect();
        for ((arg, _), t) in self.state_positions().into_iter().zip(state) {
            slots[arg] = Some(t);
        }
        slots[self.args.step] = Some(step);
        slots[self.args.tokens] = Some(tokens);
        slots[self.args.weights] = Some(weights);
        slots
            .into_iter()
            .map(|s| s.expect("every argument position is filled once"))
            .collect()
    }

    /// Name the results of one execution; `None` when there are not exactly as many as the
    /// signature says.
    pub fn outputs<T>(&self, results: Vec<T>) -> Option<StepOutputs<T>> {
        let r = &self.results;
        if results.len() != self.state_len() + 3 {
            return None;
        }
        let mut slots: Vec<Option<T>> = results.into_iter().map(Some).collect();
        let state = self
            .state_positions()
            .into_iter()
            .map(|(_, res)| slots[res].take())
            .collect::<Option<Vec<T>>>()?;
        Some(StepOutputs {
            state,
            loss: slots[r.loss].take()?,
            grad_norm: slots[r.grad_norm].take()?,
            lr: slots[r.lr].take()?,
        })
    }
}

/// Learning rate at `step` (0-based) on the host, mirroring the in-graph schedule.
pub fn lr_at(t: &TrainConfig, step: usize) -> f64 {
    let s = step as f64;
    if t.warmup > 0 && step < t.warmup {
        return t.lr * (s + 1.0) / t.warmup as f64;
    }
    let span = (t.steps.saturating_sub(t.warmup)).max(1) as f64;
    let progress = ((s - t.warmup as f64) / span).clamp(0.0, 1.0);
    let min = t.lr * t.min_lr_ratio;
    min + (t.lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

fn lr_graph(b: &Builder, t: &TrainConfig, step: Op) -> Result<Op> {
    let _s = b.name_scope("schedule");
    let c = |v: f64| b.scalar(v as f32);
    let warm = b.div(
        b.mul(c(t.lr)?, b.add(step, c(1.0)?)?)?,
        c(t.warmup.max(1) as f64)?,
    )?;
    let span = (t.steps.saturating_sub(t.warmup)).max(1) as f64;
    let progress = b.clamp(
        c(0.0)?,
        b.div(b.sub(step, c(t.warmup as f64)?)?, c(span)?)?,
        c(1.0)?,
    )?;
    let min = t.lr * t.min_lr_ratio;
    let cos = b.cos(b.mul(progress, c(std::f64::consts::PI)?)?)?;
    let decay = b.add(
        c(min)?,
        b.mul(c((t.lr - min) * 0.5)?, b.add(cos, c(1.0)?)?)?,
    )?;
    let in_warmup = b.compare(step, c(t.warmup as f64)?, hlo_builder::Cmp::Lt)?;
    b.select(in_warmup, warm, decay)
}

/// The remat policy as `rattn compile`/`dump` report it: `[train] remat`, or for a scanned
/// model (`model.scan_layers`) what the scan does instead (the backward recomputes every
/// period from its input, whatever the policy says).
pub fn remat_label(cfg: &RunConfig) -> String {
    if cfg.model.scan_layers {
        format!(
            "scan_layers (each period recomputed in the backward; [train] remat = {} not used)",
            cfg.train.remat
        )
    } else {
        cfg.train.remat.to_string()
    }
}

/// What the backward pass keeps under `cfg` (the `remat_keeps` of `rattn compile`/`dump`).
pub fn remat_keeps(cfg: &RunConfig) -> String {
    if cfg.model.scan_layers {
        "each repeat's input (the scan saves the carry; the repeat is traced again)".into()
    } else {
        cfg.train.remat.describe().into()
    }
}

/// Build the train-step computation for `cfg`, with the signature [`StepIo::new`] gives for the
/// model's parameter count, to run on `platform` (the PJRT platform name; it picks the RLA
/// lowering, see [`Model::rla_lowering`]) over the devices of `mesh`.
///
/// On a mesh of more than one device the program is annotated for XLA's SPMD partitioner: the
/// parameters, both Adam moments and the updated state carry their shardings, the token batch
/// is cut by the `batch` rule, `step` and the scalar results are replicated, the model constrains
/// its activations at layer boundaries and runs the RLA blocks in manual regions
/// ([`Model::with_mesh`]). With `mesh.shard_optimizer` (ZeRO-1) the moments are cut finer than
/// their parameters ([`state_shardings`]): the optimizer runs on the moments' pieces, each device
/// updating only its slice of each parameter, and the results' shardings gather the new
/// parameters back to their own layout. On one device nothing is annotated.
///
/// The optimizer's lowering is `cfg.train.optimizer_lowering` resolved for `platform` and the
/// mesh ([`OptimizerLowering::resolve`]). `kernel` on one device is one in-place custom call
/// (`pallas_port::adamw::adamw_call`); on a CPU mesh a manually partitioned region where each
/// device updates its pieces with a global norm (`pallas_port::adamw::adamw_sharded`); on a
/// mesh of another platform an error.
pub fn build_train_step(cfg: &RunConfig, platform: &str, mesh: &Mesh) -> Result<Computation> {
    let invalid = |e: String| hlo_builder::Error::invalid("train_step", e);
    let model = Model::new(cfg.model.clone())
        .map_err(|e| invalid(e.to_string()))?
        .with_mesh(mesh.clone())
        .map_err(|e| invalid(e.to_string()))?
        .with_remat(cfg.train.remat);
    let sharded = mesh.device_count() > 1;
    let shardings = StepShardings::new(cfg, &model, mesh).map_err(|e| invalid(e.to_string()))?;
    let m = model.config();
    let t = &cfg.train;
    let specs = model.param_specs();
    let io = StepIo::new(specs.len());
    let b = Builder::new("train_step");
    let (params, named) = model.declare_params(&b)?;
    let moments = |prefix: &str| -> Result<Vec<Op>> {
        specs
            .iter()
            .map(|s| {
                let dims: Vec<i64> = s.shape.iter().map(|&d| d as i64).collect();
                b.parameter(
                    Shape::array(ElementType::F32, &dims),
                    &format!("{prefix}.{}", s.name),
                )
            })
            .collect()
    };
    let adam_m = moments(StateGroup::AdamM.prefix())?;
    let adam_v = moments(StateGroup::AdamV.prefix())?;
    let step = b.parameter(Shape::scalar(ElementType::F32), "step")?;
    let tokens = b.parameter(
        Shape::array(ElementType::S32, &[t.batch as i64, m.seq_len as i64 + 1]),
        "tokens",
    )?;
    let weights = b.parameter(
        Shape::array(ElementType::F32, &[t.batch as i64, m.seq_len as i64]),
        "weights",
    )?;
    if sharded {
        let state = params.iter().chain(&adam_m).chain(&adam_v);
        for (&op, s) in state.zip(&shardings.state) {
            b.set_sharding(op, s.sharding.clone())?;
        }
        b.set_sharding(step, Sharding::Replicated)?;
        // The answer weights are cut along the batch like the tokens (both rank 2).
        b.set_sharding(tokens, shardings.tokens.clone())?;
        b.set_sharding(weights, shardings.tokens.clone())?;
    }
    let l = {
        let _s = b.name_scope("forward");
        model.weighted_loss(&b, &named, tokens, weights, platform)?
    };
    let grads = {
        let _s = b.name_scope("backward");
        b.grad(l, &params)?
    };
    let _s = b.name_scope("optimizer");
    let decay: Vec<bool> = specs.iter().map(decays).collect();
    let lowering = t.optimizer_lowering.resolve(platform, mesh.device_count());
    let (np, nm, nv, gnorm, lr) = match lowering {
        OptimizerLowering::Kernel if sharded && !OptimizerLowering::is_cpu(platform) => {
            return Err(invalid(format!(
                "train.optimizer_lowering = \"kernel\" runs on CPU devices only, but a mesh of \
                 {} devices on platform {platform:?} was asked for: use \"hlo\" or \"auto\"",
                mesh.device_count()
            )))
        }
        OptimizerLowering::Kernel if sharded => {
            let (lr, bc1, bc2) = step_scalars(&b, t, step)?;
            let h = pallas_port::kernel::adamw::AdamwHyper::from_f64(
                t.beta1,
                t.beta2,
                t.eps,
                t.weight_decay,
                t.clip_norm,
            );
            // The update runs on the moments' pieces: the parameters' own under the default,
            // a slice of them with `mesh.shard_optimizer` (gathered back by the results'
            // shardings below).
            let layout = moment_layout(&shardings, params.len());
            let own: Vec<Sharding> = shardings.state[..params.len()]
                .iter()
                .map(|s| s.sharding.clone())
                .collect();
            let out = pallas_port::adamw::adamw_sharded(
                &b,
                &h,
                (lr, bc1, bc2),
                (&params, &grads, &adam_m, &adam_v),
                &decay,
                (&own, &layout),
                mesh.device_count(),
            )?;
            (out.params, out.m, out.v, out.grad_norm, lr)
        }
        OptimizerLowering::Kernel => {
            let (lr, bc1, bc2) = step_scalars(&b, t, step)?;
            let h = pallas_port::kernel::adamw::AdamwHyper::from_f64(
                t.beta1,
                t.beta2,
                t.eps,
                t.weight_decay,
                t.clip_norm,
            );
            let out = pallas_port::adamw::adamw_call(
                &b,
                &h,
                (lr, bc1, bc2),
                &params,
                &grads,
                &adam_m,
                &adam_v,
                &decay,
            )?;
            (out.params, out.m, out.v, out.grad_norm, lr)
        }
        OptimizerLowering::Hlo | OptimizerLowering::Auto => {
            let (params, grads) = if sharded && mesh.shard_optimizer() {
                // ZeRO-1: each device updates the moments' slice of its parameters (the
                // gradient reduction can end in a reduce-scatter); the new parameters are
                // gathered back by the results' shardings.
                let layout = moment_layout(&shardings, params.len());
                let cut = |xs: &[Op]| -> Result<Vec<Op>> {
                    xs.iter()
                        .zip(&layout)
                        .map(|(&x, s)| b.sharding_constraint(x, s.clone()))
                        .collect()
                };
                (cut(&params)?, cut(&grads)?)
            } else {
                (params, grads)
            };
            adamw_hlo(&b, t, step, &params, &grads, &adam_m, &adam_v, &decay)?
        }
    };
    let mut results: Vec<Option<Op>> = vec![None; io.state_len() + 3];
    let state = np.into_iter().chain(nm).chain(nv);
    for ((_, r), op) in io.state_positions().into_iter().zip(state) {
        results[r] = Some(op);
    }
    results[io.results.loss] = Some(l);
    results[io.results.grad_norm] = Some(gnorm);
    results[io.results.lr] = Some(lr);
    let outs: Vec<Op> = results.into_iter().flatten().collect();
    let root = b.tuple(&outs)?;
    if sharded {
        // The updated state keeps its layout (it aliases its input); the scalars are replicated.
        let mut out: Vec<Sharding> = vec![Sharding::Replicated; io.state_len() + 3];
        for ((_, r), s) in io.state_positions().into_iter().zip(&shardings.state) {
            out[r] = s.sharding.clone();
        }
        b.set_sharding(root, Sharding::Tuple(out))?;
    }
    // Parameters and moments are updated in place when the caller donates them.
    let mut comp = b.build(root)?;
    for (arg, res) in io.state_positions() {
        comp = comp.with_input_output_alias(res, arg)?;
    }
    Ok(comp)
}

/// The first moments' shardings (both moments share them), one per parameter: the layout the
/// optimizer updates in.
fn moment_layout(shardings: &StepShardings, n: usize) -> Vec<Sharding> {
    shardings.state[n..2 * n]
        .iter()
        .map(|s| s.sharding.clone())
        .collect()
}

/// The learning rate and both bias corrections (`1 − β^t`, t = step + 1) of the step.
fn step_scalars(b: &Builder, t: &TrainConfig, step: Op) -> Result<(Op, Op, Op)> {
    let c = |v: f64| b.scalar(v as f32);
    let lr = lr_graph(b, t, step)?;
    let t1 = b.add(step, c(1.0)?)?;
    let bc1 = b.sub(c(1.0)?, b.pow(c(t.beta1)?, t1)?)?;
    let bc2 = b.sub(c(1.0)?, b.pow(c(t.beta2)?, t1)?)?;
    Ok((lr, bc1, bc2))
}

/// Updated parameters, first and second moments, the global gradient norm and the learning
/// rate.
type Updated = (Vec<Op>, Vec<Op>, Vec<Op>, Op, Op);

/// AdamW with global-norm clipping as element-wise HLO (the portable lowering;
/// `pallas_port::kernel::adamw` does the same operations in the same order).
#[allow(clippy::too_many_arguments)]
fn adamw_hlo(
    b: &Builder,
    t: &TrainConfig,
    step: Op,
    params: &[Op],
    grads: &[Op],
    adam_m: &[Op],
    adam_v: &[Op],
    decay: &[bool],
) -> Result<Updated> {
    let c = |v: f64| b.scalar(v as f32);
    // Global gradient norm and clipping.
    let mut sq = c(0.0)?;
    for &g in grads {
        let r = b.shape(g)?.rank() as i64;
        sq = b.add(sq, b.reduce_sum(b.mul(g, g)?, &(0..r).collect::<Vec<_>>())?)?;
    }
    let gnorm = b.sqrt(sq)?;
    let scale = if t.clip_norm > 0.0 {
        b.min(c(1.0)?, b.div(c(t.clip_norm)?, b.add(gnorm, c(1e-6)?)?)?)?
    } else {
        c(1.0)?
    };
    let (lr, bc1, bc2) = step_scalars(b, t, step)?;
    let (mut np, mut nm, mut nv) = (Vec::new(), Vec::new(), Vec::new());
    for (i, &decays) in decay.iter().enumerate() {
        let g = b.mul(grads[i], scale)?;
        let m1 = b.add(b.mul(adam_m[i], c(t.beta1)?)?, b.mul(g, c(1.0 - t.beta1)?)?)?;
        let v1 = b.add(
            b.mul(adam_v[i], c(t.beta2)?)?,
            b.mul(b.mul(g, g)?, c(1.0 - t.beta2)?)?,
        )?;
        let mhat = b.div(m1, bc1)?;
        let vhat = b.div(v1, bc2)?;
        let mut upd = b.div(mhat, b.add(b.sqrt(vhat)?, c(t.eps)?)?)?;
        // Decoupled weight decay on the embedding and matrices (not norm scales).
        if decays && t.weight_decay > 0.0 {
            upd = b.add(upd, b.mul(params[i], c(t.weight_decay)?)?)?;
        }
        np.push(b.sub(params[i], b.mul(upd, lr)?)?);
        nm.push(m1);
        nv.push(v1);
    }
    Ok((np, nm, nv, gnorm, lr))
}

/// Whether AdamW's decoupled weight decay applies to a parameter: the embedding and the weight
/// matrices, never norm scales.
pub fn decays(spec: &ParamSpec) -> bool {
    match spec.role {
        model::ParamRole::Embedding | model::ParamRole::Matrix => true,
        model::ParamRole::NormScale => false,
    }
}

/// Build a forward-only computation: `params…, tokens s32[B, T]` → logits `f32[B, T, V]`, to run
/// on `platform`.
pub fn build_forward(
    model: &Model,
    batch: usize,
    len: usize,
    platform: &str,
) -> Result<Computation> {
    let b = Builder::new("forward");
    let (_, named) = model.declare_params(&b)?;
    let tokens = b.parameter(
        Shape::array(ElementType::S32, &[batch as i64, len as i64]),
        "tokens",
    )?;
    let logits = model.forward(&b, &named, tokens, platform)?;
    b.build(logits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let t = TrainConfig {
            lr: 1.0,
            warmup: 10,
            steps: 110,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert!((lr_at(&t, 0) - 0.1).abs() < 1e-12);
        assert!((lr_at(&t, 9) - 1.0).abs() < 1e-12);
        assert!((lr_at(&t, 10) - 1.0).abs() < 1e-12);
        assert!((lr_at(&t, 60) - 0.55).abs() < 1e-12);
        assert!((lr_at(&t, 110) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn adam_moments_share_their_parameters_shardings() {
        let model = Model::new(
            RunConfig::from_toml(
                &std::fs::read_to_string(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/../../configs/tiny.toml"
                ))
                .unwrap(),
                &[],
            )
            .unwrap()
            .model,
        )
        .unwrap();
        let mesh = model::MeshConfig {
            fsdp: 2,
            tensor: 2,
            ..Default::default()
        }
        .resolve(4)
        .unwrap();
        let state = state_shardings(&model, &mesh).unwrap();
        let tensors = state_tensors(model.param_specs());
        let n = model.param_specs().len();
        assert_eq!(state.len(), 3 * n);
        for (i, (s, t)) in state.iter().zip(&tensors).enumerate() {
            assert_eq!(s.name, t.name);
            assert_eq!(s.sharding, state[i % n].sharding, "{}", s.name);
            assert_eq!(s.spec, state[i % n].spec, "{}", s.name);
        }
        assert!(matches!(
            state[n].sharding,
            hlo_builder::Sharding::Tiled { .. }
        ));
    }

    #[test]
    fn the_signature_names_every_argument_and_result_of_the_built_step() {
        let cfg = RunConfig::from_toml(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../configs/tiny.toml"
            ))
            .unwrap(),
            &["model.seq_len=16".into(), "train.batch=2".into()],
        )
        .unwrap();
        let model = Model::new(cfg.model.clone()).unwrap();
        let specs = model.param_specs();
        let io = StepIo::new(specs.len());
        let (args, result) = build_train_step(&cfg, "cpu", &model::Mesh::single())
            .unwrap()
            .program_shape();
        assert_eq!(args.len(), io.state_len() + 3);
        assert_eq!(args[io.args.step], Shape::scalar(ElementType::F32));
        assert_eq!(
            args[io.args.tokens],
            Shape::array(ElementType::S32, &[2, 17])
        );
        assert_eq!(
            args[io.args.weights],
            Shape::array(ElementType::F32, &[2, 16])
        );
        let results = result.tuple_elements().unwrap();
        assert_eq!(results.len(), io.state_len() + 3);
        for i in [io.results.loss, io.results.grad_norm, io.results.lr] {
            assert_eq!(results[i], Shape::scalar(ElementType::F32));
        }
        let names = state_tensors(specs);
        for ((arg, res), t) in io.state_positions().into_iter().zip(&names) {
            let dims: Vec<i64> = t.spec.shape.iter().map(|&d| d as i64).collect();
            let want = Shape::array(ElementType::F32, &dims);
            assert_eq!((&args[arg], &results[res]), (&want, &want), "{}", t.name);
        }
        assert_eq!(names[specs.len()].name, format!("adam_m.{}", specs[0].name));
        // Arguments and outputs round-trip through the names.
        let state: Vec<usize> = (0..io.state_len()).collect();
        let n = io.state_len();
        let a = io.arguments(state.clone(), n, n + 1, n + 2);
        assert_eq!(
            (a[io.args.step], a[io.args.tokens], a[io.args.weights]),
            (n, n + 1, n + 2)
        );
        let out = io.outputs((0..n + 3).collect::<Vec<_>>()).unwrap();
        assert_eq!(out.state, state);
        assert_eq!((out.loss, out.grad_norm, out.lr), (n, n + 1, n + 2));
        assert!(io.outputs(vec![0; n]).is_none());
    }

    #[test]
    fn remat_is_a_train_setting_that_recomputes_the_blocks() {
        // The 3:1 stack (3 local + 1 global layer).
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../configs/tiny-3to1.toml"
        ))
        .unwrap();
        let over = |v: &str| {
            RunConfig::from_toml(
                &text,
                &["model.seq_len=64".into(), format!("train.remat={v}")],
            )
        };
        let cfg = over("\"layer_inputs\"").unwrap();
        assert_eq!(cfg.train.remat, model::Remat::LayerInputs);
        let one = model::Mesh::single();
        let remat = build_train_step(&cfg, "cpu", &one).unwrap().to_text();
        // One barrier per layer, and each layer's RLA forward block twice (forward, recompute).
        assert_eq!(remat.matches(" opt-barrier(").count(), 4);
        assert_eq!(remat.matches("\"rattention.rla_fwd\"").count(), 6);
        let plain = build_train_step(&over("\"none\"").unwrap(), "cpu", &one)
            .unwrap()
            .to_text();
        assert_eq!(plain.matches(" opt-barrier(").count(), 0);
        let e = format!("{:#}", over("\"dots\"").unwrap_err());
        assert!(e.contains("layer_inputs"), "{e}");
    }

    #[test]
    fn dot_saving_remat_recomputes_no_saved_matmul() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../configs/tiny-3to1.toml"
        ))
        .unwrap();
        let one = model::Mesh::single();
        let step = |v: &str| {
            let cfg = RunConfig::from_toml(
                &text,
                // Attention as HLO: the batched attention dots counted below are its.
                &[
                    "model.seq_len=64".into(),
                    "model.attention_lowering=\"hlo\"".into(),
                    format!("train.remat=\"{v}\""),
                ],
            )
            .unwrap();
            let t = build_train_step(&cfg, "cpu", &one).unwrap().to_text();
            (
                cfg.train.remat,
                t.matches(" dot(").count(),
                t.matches("\"rattention.rla_fwd\"").count(),
            )
        };
        let (_, plain, _) = step("none");
        let (_, full, _) = step("layer_inputs");
        let (remat, dots, rla) = step("dots_saveable");
        assert_eq!(remat, model::Remat::Dots);
        // No dot is traced twice; the RLA forward kernel is (its results are not saved).
        assert_eq!(dots, plain);
        assert_eq!(rla, 6);
        // The alias: only the batched attention dots (scores, context) are traced again.
        let (remat, minimal, _) = step("minimal");
        assert_eq!(remat, model::Remat::DotsWithNoBatchDims);
        assert!(
            plain < minimal && minimal < full,
            "{plain} {minimal} {full}"
        );
        // 4 layers × 7 projections are saved, so layer_inputs traces them again.
        assert_eq!(full - minimal, 4 * 7);
    }
}
