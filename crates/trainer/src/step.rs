//! The compiled train step: forward, loss, gradients (autodiff with RLA's custom VJP), global-norm
//! clipping, the learning-rate schedule and AdamW — one XLA program. Parameters and both Adam moments
//! stay on the device between steps; only the token batch crosses.
//!
//! Arguments: `params… , m… , v… , step: f32[], tokens: s32[B, T+1]`.
//! Results (a flat tuple): `params'… , m'… , v'… , loss, grad_norm, lr`. Each updated parameter and
//! moment aliases its input (`input_output_alias`), so a donating caller updates them in place.

use crate::config::{RunConfig, TrainConfig};
use hlo_builder::{Builder, Computation, ElementType, Op, Result, Shape};
use model::transformer::{declare_params, loss};

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

/// Build the train-step computation for `cfg`, to run on `platform` (the PJRT platform name; it
/// picks the RLA lowering, see [`model::transformer::rla_lowering`]).
pub fn build_train_step(cfg: &RunConfig, platform: &str) -> Result<Computation> {
    let m = &cfg.model;
    let t = &cfg.train;
    let b = Builder::new("train_step");
    let (params, named) = declare_params(&b, m)?;
    let specs = model::param_specs(m);
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
    let adam_m = moments("adam_m")?;
    let adam_v = moments("adam_v")?;
    let step = b.parameter(Shape::scalar(ElementType::F32), "step")?;
    let tokens = b.parameter(
        Shape::array(ElementType::S32, &[t.batch as i64, m.seq_len as i64 + 1]),
        "tokens",
    )?;
    let l = {
        let _s = b.name_scope("forward");
        loss(&b, m, &named, tokens, platform)?
    };
    let grads = {
        let _s = b.name_scope("backward");
        b.grad(l, &params)?
    };
    let _s = b.name_scope("optimizer");
    let c = |v: f64| b.scalar(v as f32);
    // Global gradient norm and clipping.
    let mut sq = c(0.0)?;
    for &g in &grads {
        let r = b.shape(g)?.rank() as i64;
        sq = b.add(sq, b.reduce_sum(b.mul(g, g)?, &(0..r).collect::<Vec<_>>())?)?;
    }
    let gnorm = b.sqrt(sq)?;
    let scale = if t.clip_norm > 0.0 {
        b.min(c(1.0)?, b.div(c(t.clip_norm)?, b.add(gnorm, c(1e-6)?)?)?)?
    } else {
        c(1.0)?
    };
    let lr = lr_graph(&b, t, step)?;
    let t1 = b.add(step, c(1.0)?)?;
    let bc1 = b.sub(c(1.0)?, b.pow(c(t.beta1)?, t1)?)?;
    let bc2 = b.sub(c(1.0)?, b.pow(c(t.beta2)?, t1)?)?;
    let (mut np, mut nm, mut nv) = (Vec::new(), Vec::new(), Vec::new());
    for (i, spec) in specs.iter().enumerate() {
        let g = b.mul(grads[i], scale)?;
        let m1 = b.add(b.mul(adam_m[i], c(t.beta1)?)?, b.mul(g, c(1.0 - t.beta1)?)?)?;
        let v1 = b.add(
            b.mul(adam_v[i], c(t.beta2)?)?,
            b.mul(b.mul(g, g)?, c(1.0 - t.beta2)?)?,
        )?;
        let mhat = b.div(m1, bc1)?;
        let vhat = b.div(v1, bc2)?;
        let mut upd = b.div(mhat, b.add(b.sqrt(vhat)?, c(t.eps)?)?)?;
        // Decoupled weight decay on matrices only (not norm scales).
        if spec.shape.len() >= 2 && !spec.name.ends_with(".scale") && t.weight_decay > 0.0 {
            upd = b.add(upd, b.mul(params[i], c(t.weight_decay)?)?)?;
        }
        np.push(b.sub(params[i], b.mul(upd, lr)?)?);
        nm.push(m1);
        nv.push(v1);
    }
    let mut outs = np;
    outs.extend(nm);
    outs.extend(nv);
    outs.extend([l, gnorm, lr]);
    let root = b.tuple(&outs)?;
    // Parameters and moments are updated in place when the caller donates them.
    let mut comp = b.build(root)?;
    for i in 0..3 * specs.len() {
        comp = comp.with_input_output_alias(i, i)?;
    }
    Ok(comp)
}

/// Build a forward-only computation: `params…, tokens s32[B, T]` → logits `f32[B, T, V]`, to run
/// on `platform`.
pub fn build_forward(
    cfg: &model::ModelConfig,
    batch: usize,
    len: usize,
    platform: &str,
) -> Result<Computation> {
    let b = Builder::new("forward");
    let (_, named) = declare_params(&b, cfg)?;
    let tokens = b.parameter(
        Shape::array(ElementType::S32, &[batch as i64, len as i64]),
        "tokens",
    )?;
    let logits = model::transformer::forward(&b, cfg, &named, tokens, platform)?;
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
}
