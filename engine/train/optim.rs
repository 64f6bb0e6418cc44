//! AdamW with f32 state, gradient-norm clipping, learning-rate schedules and gradient
//! accumulation (docs/training.md).
//!
//! The arithmetic follows PyTorch's CPU `torch.optim.AdamW` (single-tensor path) and
//! `torch.nn.utils.clip_grad_norm_` operation by operation, and the schedules follow
//! transformers' `get_cosine_schedule_with_warmup` / `get_constant_schedule_with_warmup`, so a
//! run replays a PyTorch run to float32 rounding (tests/optim.rs). Everything is deterministic:
//! element-wise updates are independent of the thread count, and reductions are summed in a
//! fixed chunk order.
use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A named f32 tensor: name, shape, row-major values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Elements per parallel chunk. Fixed, so chunk boundaries (and reduction order) do not depend
/// on the number of threads.
const CHUNK: usize = 1 << 15;

/// AdamW hyperparameters. Defaults are PyTorch's: betas (0.9, 0.999), eps 1e-8, weight decay
/// 0.01 (lr 1e-3).
///
/// The scalars are f64 because PyTorch keeps them as Python floats: an f32 `beta2 = 0.999`
/// would shift the first bias correction `1 - beta2` by 1.3e-5 relative.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    /// Base learning rate (the schedule scales it; `Optimizer::step` takes the scheduled value).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied only to parameters marked `decay`.
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamW {
    /// Rejects values PyTorch rejects (negative lr/eps/decay, betas outside [0, 1)) and
    /// non-finite ones.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64| Err(Error::Input(format!("AdamW {what} = {v} is invalid")));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", self.lr);
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad("eps", self.eps);
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", self.beta1);
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", self.beta2);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay);
        }
        Ok(())
    }
}

/// One parameter tensor handed to [`Optimizer::step`]: its name (as registered), its values
/// (updated in place) and its gradient (already clipped / averaged by the caller).
pub struct ParamRef<'a> {
    pub name: &'a str,
    pub values: &'a mut [f32],
    pub grad: &'a [f32],
    /// Apply decoupled weight decay to this tensor (PyTorch: its parameter group's
    /// `weight_decay`; 0 for a no-decay group).
    pub decay: bool,
}

/// AdamW state of one parameter tensor: first and second moments (f32, like the parameter) and
/// the number of updates applied.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamState {
    pub shape: Vec<usize>,
    /// `exp_avg` in PyTorch.
    pub m: Vec<f32>,
    /// `exp_avg_sq` in PyTorch.
    pub v: Vec<f32>,
    pub step: u64,
}

/// AdamW over a fixed set of named parameter tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    pub config: AdamW,
    names: Vec<String>,
    index: HashMap<String, usize>,
    states: Vec<ParamState>,
}

impl Optimizer {
    /// Registers the parameters (name, shape) with zero moments and step 0, which is what
    /// PyTorch's lazily created state holds before the first update.
    pub fn new(config: AdamW, params: &[(&str, &[usize])]) -> Result<Self> {
        config.validate()?;
        let mut names = Vec::with_capacity(params.len());
        let mut index = HashMap::with_capacity(params.len());
        let mut states = Vec::with_capacity(params.len());
        for (name, shape) in params {
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(Error::Input(format!("parameter name {name:?} is not a plain name")));
            }
            let n = checked_numel(shape)
                .ok_or_else(|| Error::Input(format!("parameter `{name}` shape {shape:?} overflows")))?;
            if index.insert(name.to_string(), states.len()).is_some() {
                return Err(Error::Input(format!("parameter `{name}` registered twice")));
            }
            names.push(name.to_string());
            states.push(ParamState {
                shape: shape.to_vec(),
                m: vec![0.0; n],
                v: vec![0.0; n],
                step: 0,
            });
        }
        Ok(Optimizer {
            config,
            names,
            index,
            states,
        })
    }

    /// Registered names, in registration order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The state of one parameter.
    pub fn state(&self, name: &str) -> Option<&ParamState> {
        self.index.get(name).map(|&i| &self.states[i])
    }

    /// The state of one parameter, to update in place: the trainer's device path runs the update
    /// on the GPU and keeps the step counts (and, at checkpoints, the moments) here.
    pub(crate) fn state_mut(&mut self, name: &str) -> Option<&mut ParamState> {
        self.index.get(name).map(|&i| &mut self.states[i])
    }

    /// One AdamW update of every listed parameter at learning rate `lr` (the scheduled value).
    ///
    /// Per element, in PyTorch's order and precision (scalars in f64, rounded to f32 where
    /// PyTorch passes them to an f32 kernel):
    /// `p *= 1 - lr*wd` (decay only); `m += (1-b1)*(g-m)`; `v = v*b2 + (1-b2)*g*g`;
    /// `denom = sqrt(v)/sqrt(1-b2^t) + eps`; `p += (-lr/(1-b1^t)) * m / denom`.
    ///
    /// Checks everything before touching anything: unknown or repeated names and length
    /// mismatches are `Error::Input`, a non-finite gradient is `Error::NonFinite`.
    pub fn step(&mut self, params: &mut [ParamRef<'_>], lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::Input(format!("learning rate {lr} is invalid")));
        }
        let mut seen = vec![false; self.states.len()];
        let mut slots = Vec::with_capacity(params.len());
        for p in params.iter() {
            let &i = self
                .index
                .get(p.name)
                .ok_or_else(|| Error::Input(format!("parameter `{}` is not registered with the optimizer", p.name)))?;
            if std::mem::replace(&mut seen[i], true) {
                return Err(Error::Input(format!("parameter `{}` passed twice to one step", p.name)));
            }
            let n = self.states[i].m.len();
            if p.values.len() != n || p.grad.len() != n {
                return Err(Error::Input(format!(
                    "parameter `{}`: {} values and {} gradient entries, registered with {n}",
                    p.name,
                    p.values.len(),
                    p.grad.len()
                )));
            }
            if !all_finite(p.grad) {
                return Err(Error::NonFinite(format!("gradient of `{}`", p.name)));
            }
            slots.push(i);
        }

        let c = self.config;
        for (p, &i) in params.iter_mut().zip(&slots) {
            let st = &mut self.states[i];
            st.step += 1;
            let t = st.step as f64;
            // torch: param.mul_(1 - lr * weight_decay), skipped when weight_decay == 0.
            let decay = (p.decay && c.weight_decay != 0.0).then_some((1.0 - lr * c.weight_decay) as f32);
            let w1 = (1.0 - c.beta1) as f32; // exp_avg.lerp_(grad, 1 - beta1)
            let b2 = c.beta2 as f32; // exp_avg_sq.mul_(beta2)
            let w2 = (1.0 - c.beta2) as f32; // .addcmul_(grad, grad, value=1 - beta2)
            let bc1 = 1.0 - c.beta1.powf(t);
            let bc2_sqrt = (1.0 - c.beta2.powf(t)).sqrt() as f32;
            let eps = c.eps as f32;
            let neg_step = (-(lr / bc1)) as f32;
            p.values
                .par_chunks_mut(CHUNK)
                .zip(p.grad.par_chunks(CHUNK))
                .zip(st.m.par_chunks_mut(CHUNK))
                .zip(st.v.par_chunks_mut(CHUNK))
                .for_each(|(((pv, g), m), v)| {
                    for j in 0..pv.len() {
                        let mut x = pv[j];
                        if let Some(d) = decay {
                            x *= d;
                        }
                        let gj = g[j];
                        let mj = m[j] + w1 * (gj - m[j]);
                        let vj = v[j] * b2 + w2 * gj * gj;
                        let denom = vj.sqrt() / bc2_sqrt + eps;
                        pv[j] = x + neg_step * mj / denom;
                        m[j] = mj;
                        v[j] = vj;
                    }
                });
        }
        Ok(())
    }

    /// The state as named tensors, in registration order: per parameter `{name}.exp_avg`,
    /// `{name}.exp_avg_sq` (the parameter's shape) and `{name}.step` (shape `[]`, the update
    /// count as f32 like PyTorch's `state["step"]`; exact below 2^24 steps).
    pub fn state_tensors(&self) -> Vec<NamedTensor> {
        let mut out = Vec::with_capacity(3 * self.states.len());
        for (name, st) in self.names.iter().zip(&self.states) {
            out.push((format!("{name}.exp_avg"), st.shape.clone(), st.m.clone()));
            out.push((format!("{name}.exp_avg_sq"), st.shape.clone(), st.v.clone()));
            out.push((format!("{name}.step"), vec![], vec![st.step as f32]));
        }
        out
    }

    /// Replaces the state with `tensors` (as produced by [`Optimizer::state_tensors`], in any
    /// order) read from `file`. Every registered parameter must be there with its shape; errors
    /// name `file` and the tensor. Nothing changes unless everything checks out.
    pub fn load_state(&mut self, file: &Path, tensors: &[NamedTensor]) -> Result<()> {
        let by_name: HashMap<&str, (&Vec<usize>, &Vec<f32>)> =
            tensors.iter().map(|(n, s, d)| (n.as_str(), (s, d))).collect();
        let get = |tensor: String, shape: &[usize]| -> Result<&Vec<f32>> {
            let (s, d) = by_name.get(tensor.as_str()).ok_or_else(|| Error::MissingTensor {
                path: file.to_path_buf(),
                tensor: tensor.clone(),
            })?;
            if s.as_slice() != shape || checked_numel(s) != Some(d.len()) {
                return Err(Error::ShapeMismatch {
                    path: file.to_path_buf(),
                    tensor,
                    expected: shape.to_vec(),
                    got: s.to_vec(),
                });
            }
            if !all_finite(d) {
                return Err(Error::NonFinite(format!("{}: tensor `{tensor}`", file.display())));
            }
            Ok(d)
        };
        let mut new_states = Vec::with_capacity(self.states.len());
        for (name, st) in self.names.iter().zip(&self.states) {
            let m = get(format!("{name}.exp_avg"), &st.shape)?;
            let v = get(format!("{name}.exp_avg_sq"), &st.shape)?;
            let step_name = format!("{name}.step");
            let s = get(step_name.clone(), &[])?[0];
            if !(s >= 0.0 && s.fract() == 0.0 && s < (1u64 << 24) as f32) {
                return Err(Error::InvalidField {
                    path: file.to_path_buf(),
                    field: step_name,
                    msg: format!("{s} is not a step count"),
                });
            }
            if let Some(bad) = v.iter().position(|&x| x < 0.0) {
                return Err(Error::InvalidField {
                    path: file.to_path_buf(),
                    field: format!("{name}.exp_avg_sq"),
                    msg: format!("negative second moment {} at index {bad}", v[bad]),
                });
            }
            new_states.push(ParamState {
                shape: st.shape.clone(),
                m: m.clone(),
                v: v.clone(),
                step: s as u64,
            });
        }
        let known: std::collections::HashSet<String> = self
            .names
            .iter()
            .flat_map(|n| [format!("{n}.exp_avg"), format!("{n}.exp_avg_sq"), format!("{n}.step")])
            .collect();
        if let Some((extra, _, _)) = tensors.iter().find(|(n, _, _)| !known.contains(n)) {
            return Err(Error::Format {
                path: file.to_path_buf(),
                format: "optimizer state",
                msg: format!("tensor `{extra}` belongs to no registered parameter"),
            });
        }
        self.states = new_states;
        Ok(())
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` with the 2-norm: returns the total norm
/// of all gradients (as one vector) before clipping and, when it exceeds `max_norm`, scales
/// every gradient by `max_norm / (norm + 1e-6)`.
///
/// A non-finite total norm is returned with the gradients untouched (PyTorch would multiply
/// them by NaN); the caller should skip the step or stop.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let total = grad_norm(grads.iter().map(|g| &**g));
    if !total.is_finite() {
        return total;
    }
    // torch: clip_coef = max_norm / (total_norm + 1e-6), a Python float divided by an f32
    // tensor, which Tensor.__rtruediv__ evaluates as reciprocal(total_norm + 1e-6) * max_norm.
    let coef = (1.0f32 / (total + 1e-6f32)) * max_norm;
    if coef < 1.0 {
        for g in grads.iter_mut() {
            g.par_chunks_mut(CHUNK)
                .for_each(|c| c.iter_mut().for_each(|x| *x *= coef));
        }
    }
    total
}

/// The 2-norm of the gradients viewed as one vector, computed like PyTorch: each tensor's norm
/// (rounded to f32), then the norm of those norms. Sums are f64 in fixed-size chunks added in
/// order, so the result does not depend on the thread count.
pub fn grad_norm<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> f32 {
    let mut total = 0.0f64;
    for g in grads {
        let partial: Vec<f64> = g
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
            .collect();
        let norm = partial.iter().sum::<f64>().sqrt() as f32;
        total += norm as f64 * norm as f64;
    }
    total.sqrt() as f32
}

/// Learning-rate schedule, as a factor of the base LR at optimizer step `step` (0-based: the
/// number of updates already applied, which is what `LambdaLR` passes to its lambda, so the
/// first update of a warmup schedule uses LR 0 as in transformers).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// Always the base LR.
    Constant,
    /// `get_constant_schedule_with_warmup`: `step / max(1, warmup)` below `warmup_steps`, then 1.
    LinearWarmup { warmup_steps: u64 },
    /// `get_cosine_schedule_with_warmup` (num_cycles 0.5, `min_lr_rate` = `min_lr_ratio`):
    /// linear warmup, then `r + (1 - r) * 0.5 * (1 + cos(pi * progress))` with
    /// `progress = (step - warmup) / max(1, total - warmup)`. Past `total_steps` the factor stays
    /// at `r` (transformers' curve would climb back up there).
    WarmupCosine {
        warmup_steps: u64,
        total_steps: u64,
        #[serde(default)]
        min_lr_ratio: f64,
    },
}

impl Schedule {
    /// The warmup + cosine schedule with `min_lr_ratio` 0.
    pub fn warmup_cosine(warmup_steps: u64, total_steps: u64) -> Self {
        Schedule::WarmupCosine {
            warmup_steps,
            total_steps,
            min_lr_ratio: 0.0,
        }
    }

    /// The multiplier of the base LR at `step` (see the type's docs).
    pub fn factor(&self, step: u64) -> f64 {
        match *self {
            Schedule::Constant => 1.0,
            Schedule::LinearWarmup { warmup_steps } => {
                if step < warmup_steps {
                    step as f64 / warmup_steps.max(1) as f64
                } else {
                    1.0
                }
            }
            Schedule::WarmupCosine {
                warmup_steps,
                total_steps,
                min_lr_ratio,
            } => {
                if step < warmup_steps {
                    return step as f64 / warmup_steps.max(1) as f64;
                }
                let step = step.min(total_steps.max(warmup_steps));
                let progress = (step - warmup_steps) as f64 / total_steps.saturating_sub(warmup_steps).max(1) as f64;
                let factor = 0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos());
                let factor = factor * (1.0 - min_lr_ratio) + min_lr_ratio;
                factor.max(0.0)
            }
        }
    }

    /// `base_lr * factor(step)`, the LR for the update that follows `step` completed ones.
    pub fn lr_at(&self, base_lr: f64, step: u64) -> f64 {
        base_lr * self.factor(step)
    }

    /// Rejects a warmup longer than the run and a `min_lr_ratio` outside [0, 1].
    pub fn validate(&self) -> Result<()> {
        if let Schedule::WarmupCosine {
            warmup_steps,
            total_steps,
            min_lr_ratio,
        } = *self
        {
            if warmup_steps > total_steps {
                return Err(Error::Input(format!(
                    "schedule warmup_steps {warmup_steps} exceeds total_steps {total_steps}"
                )));
            }
            if !(0.0..=1.0).contains(&min_lr_ratio) {
                return Err(Error::Input(format!(
                    "schedule min_lr_ratio {min_lr_ratio} is outside [0, 1]"
                )));
            }
        }
        Ok(())
    }
}

fn checked_numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

fn all_finite(x: &[f32]) -> bool {
    x.par_chunks(CHUNK).all(|c| c.iter().all(|v| v.is_finite()))
}
