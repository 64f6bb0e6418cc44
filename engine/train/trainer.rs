//! The training loop: seeded data order, gradient accumulation with ILREC.md's normalisation
//! (all response tokens of the accumulated batch), clipping, AdamW with warmup + cosine, atomic
//! checkpoints and exact resume on the CPU.
use super::backprop::{forward_backward, Grads, Objective, TrainBatch};
use crate::backend::cuda::model::CudaModel;
use crate::backend::cuda::ops::optim::AdamWScalars;
use crate::backend::cuda::train::{forward_backward_resident, ResidentParams};
use crate::backend::cuda::{Cuda, Elem};
use super::checkpoint::{self, Checkpoint};
use super::lora::{Lora, LoraConfig, Target};
use super::loss::LossStats;
use super::optim::{clip_grad_norm, AdamW, NamedTensor, Optimizer, ParamRef, ParamState, Schedule};
use crate::error::{Error, Result};
use crate::model::{Batch, Model};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One training sample: a token sequence and the positions whose next token is supervised.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    /// Positions `t` (within `tokens`) whose logits must predict `targets[i]`.
    pub loss_positions: Vec<usize>,
    pub targets: Vec<u32>,
    /// Per loss position: the target is an item-identifier token (ILRec terms apply).
    pub item_mask: Vec<bool>,
    /// Per loss position and candidate token: CF rewards, `[positions, S]`.
    pub rewards: Option<Vec<f32>>,
}

impl Example {
    /// An SFT-style sample: `prompt` followed by `response`, loss on every response token.
    pub fn prompt_response(prompt: &[u32], response: &[u32]) -> Self {
        let tokens: Vec<u32> = prompt.iter().chain(response).copied().collect();
        let start = prompt.len().saturating_sub(1);
        let loss_positions: Vec<usize> = (start..start + response.len()).collect();
        Example { item_mask: vec![false; response.len()], targets: response.to_vec(), loss_positions, tokens, rewards: None }
    }

    fn check(&self, i: usize) -> Result<()> {
        let m = self.loss_positions.len();
        if self.tokens.is_empty() || m == 0 || self.targets.len() != m || self.item_mask.len() != m {
            return Err(Error::Input(format!(
                "training example {i}: {} tokens, {m} loss positions, {} targets, {} item flags",
                self.tokens.len(),
                self.targets.len(),
                self.item_mask.len()
            )));
        }
        if let Some(&p) = self.loss_positions.iter().find(|&&p| p >= self.tokens.len()) {
            return Err(Error::Input(format!("training example {i}: loss position {p} is past its {} tokens", self.tokens.len())));
        }
        Ok(())
    }
}

/// Hyper-parameters of a run (defaults: the authors' recipe, ILREC.md section 8, with a
/// CPU-sized batch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub lora_rank: usize,
    pub lora_alpha: f32,
    pub lora_dropout: f32,
    pub lora_targets: Vec<String>,
    pub lr: f64,
    /// Learning rate of the new token rows (embedding and LM head), a separate parameter
    /// group under the same schedule; `None`: `lr`. Fresh rows start at the average token and
    /// must overtake the whole pretrained vocabulary, which short runs do faster with a
    /// larger rate than LoRA tolerates.
    pub token_lr: Option<f64>,
    pub weight_decay: f64,
    pub max_grad_norm: f32,
    pub warmup_ratio: f64,
    pub epochs: f64,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub seed: u64,
    /// Save a checkpoint every this many optimizer steps (0: only at the end).
    pub checkpoint_every: u64,
    pub keep_checkpoints: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lora_rank: 64,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            lora_targets: Target::ALL.iter().map(|t| t.name().to_string()).collect(),
            lr: 5e-5,
            token_lr: None,
            weight_decay: 0.0,
            max_grad_norm: 0.3,
            warmup_ratio: 0.05,
            epochs: 1.0,
            micro_batch: 4,
            grad_accum: 1,
            seed: 0,
            checkpoint_every: 0,
            keep_checkpoints: 2,
        }
    }
}

impl TrainConfig {
    pub fn lora_config(&self) -> Result<LoraConfig> {
        let targets = self
            .lora_targets
            .iter()
            .map(|n| Target::from_name(n).ok_or_else(|| Error::Input(format!("lora_targets: `{n}` is not one of q,k,v,o,gate,up,down _proj"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(LoraConfig { rank: self.lora_rank, alpha: self.lora_alpha, dropout: self.lora_dropout, targets })
    }

    // Written as negations so that NaN fails every check.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn validate(&self) -> Result<()> {
        if self.micro_batch == 0 || self.grad_accum == 0 || !(self.epochs > 0.0) || !(0.0..=1.0).contains(&self.warmup_ratio) || !(self.max_grad_norm > 0.0) {
            return Err(Error::Input(format!(
                "train config: need micro_batch, grad_accum > 0, epochs > 0, warmup_ratio in [0, 1], max_grad_norm > 0; got {self:?}"
            )));
        }
        Ok(())
    }
}

/// What one optimizer step did.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// Optimizer steps completed, this one included.
    pub step: u64,
    pub total_steps: u64,
    pub lr: f64,
    /// Loss terms of the accumulated batch (each normalised by its response tokens).
    pub stats: LossStats,
    /// Gradient norm before clipping.
    pub grad_norm: f32,
    /// Tokens processed (padding excluded) and response tokens supervised.
    pub tokens: usize,
    pub response_tokens: usize,
    pub seconds: f64,
}

/// One micro-batch's forward + backward time under the run's objective and under SFT
/// (`Trainer::time_against_sft`).
#[derive(Clone, Copy, Debug)]
pub struct StepCost {
    pub objective_s: f64,
    pub sft_s: f64,
    /// Tokens of the micro-batch (padding excluded).
    pub tokens: usize,
}

impl StepCost {
    /// The objective's step time over SFT's.
    pub fn ratio(&self) -> f64 {
        self.objective_s / self.sft_s
    }
}

const EMBED_ROWS: &str = "trainable_tokens.embed_rows";
const HEAD_ROWS: &str = "trainable_tokens.head_rows";

/// A training run in progress.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub lora: Lora,
    opt: Optimizer,
    schedule: Schedule,
    rng: Rng,
    trainable_tokens: Vec<u32>,
    embed_rows: Vec<f32>,
    head_rows: Vec<f32>,
    step: u64,
    micro_step: u64,
    epoch: u64,
    cursor: u64,
    total_steps: u64,
    n_examples: usize,
    /// The model's weights on the GPU when micro-batches run there (`use_cuda`).
    gpu: Option<CudaModel>,
    /// With `gpu`: the trainable parameters, their gradients and AdamW moments on the device,
    /// made at the first step from the host state. While it exists its moments are the run's
    /// (the host optimiser keeps only the step counts current); values come back to the host
    /// after every step.
    resident: Option<ResidentParams>,
}

fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = Rng::new(seed ^ (epoch.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// The `k` examples from position (`epoch`, `cursor`) of the seeded data order, and the position
/// after them.
fn examples_from(seed: u64, n: usize, (mut epoch, mut cursor): (u64, u64), k: usize) -> (Vec<usize>, u64, u64) {
    let mut out = Vec::with_capacity(k);
    let mut order = epoch_order(seed, epoch, n);
    while out.len() < k {
        if cursor as usize >= n {
            epoch += 1;
            cursor = 0;
            order = epoch_order(seed, epoch, n);
        }
        out.push(order[cursor as usize]);
        cursor += 1;
    }
    (out, epoch, cursor)
}

fn rows_of(src: &[f32], tokens: &[u32], h: usize) -> Vec<f32> {
    tokens.iter().flat_map(|&t| src[t as usize * h..(t as usize + 1) * h].iter().copied()).collect()
}

impl Trainer {
    /// A fresh run: LoRA initialised as PEFT does, optimiser state zero. `trainable_tokens` are
    /// vocabulary ids whose embedding (and untied LM-head) rows are trained.
    pub fn new(model: &Model, cfg: TrainConfig, n_examples: usize, trainable_tokens: Vec<u32>) -> Result<Self> {
        cfg.validate()?;
        if n_examples == 0 {
            return Err(Error::Input("no training examples".into()));
        }
        let v = model.config.vocab_size;
        if let Some(&t) = trainable_tokens.iter().find(|&&t| t as usize >= v) {
            return Err(Error::Input(format!("trainable token {t} is outside the vocabulary ({v})")));
        }
        let mut rng = Rng::new(cfg.seed);
        let lora = Lora::new(model, cfg.lora_config()?, &mut rng)?;
        let h = model.config.hidden_size;
        let embed_rows = rows_of(&model.embed, &trainable_tokens, h);
        let head_rows = model.lm_head.as_ref().map(|l| rows_of(&l.w, &trainable_tokens, h)).unwrap_or_default();
        let mut shapes: Vec<(String, Vec<usize>)> = lora.named().into_iter().map(|(n, s, _)| (n, s)).collect();
        shapes.push((EMBED_ROWS.into(), vec![trainable_tokens.len(), h]));
        shapes.push((HEAD_ROWS.into(), vec![head_rows.len() / h.max(1), h]));
        let refs: Vec<(&str, &[usize])> = shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
        let opt = Optimizer::new(AdamW { lr: cfg.lr, weight_decay: cfg.weight_decay, ..Default::default() }, &refs)?;
        let per_step = cfg.micro_batch * cfg.grad_accum;
        let total_steps = ((cfg.epochs * n_examples as f64) / per_step as f64).ceil().max(1.0) as u64;
        let warmup = (cfg.warmup_ratio * total_steps as f64).ceil() as u64;
        let schedule = Schedule::warmup_cosine(warmup.min(total_steps), total_steps);
        Ok(Trainer {
            cfg,
            lora,
            opt,
            schedule,
            rng,
            trainable_tokens,
            embed_rows,
            head_rows,
            step: 0,
            micro_step: 0,
            epoch: 0,
            cursor: 0,
            total_steps,
            n_examples,
            gpu: None,
            resident: None,
        })
    }

    /// Runs every step on the GPU from now on: micro-batches' forward and backward, gradient
    /// clipping and AdamW, with the trainable parameters resident there between steps (their
    /// values come back to the host after each step). Uploads `model` with projection weights in
    /// `weights` (f32 or bf16). `model` already holds the current trainable token rows
    /// (`write_rows` keeps it in step), so the upload carries them; a later `resume` or step
    /// writes them to both copies.
    pub fn use_cuda(&mut self, cuda: &Cuda, model: &Model, weights: Elem) -> Result<()> {
        self.sync_moments()?;
        self.gpu = Some(CudaModel::upload(cuda, model, weights)?);
        Ok(())
    }

    /// Brings the device's AdamW moments back into the host optimiser and drops the device
    /// state (rebuilt from the host at the next GPU step).
    fn sync_moments(&mut self) -> Result<()> {
        if let Some(res) = self.resident.take() {
            let opt = self.optimizer_with(&res)?;
            self.opt = opt;
        }
        Ok(())
    }

    /// The host optimiser with the moments of `res`.
    fn optimizer_with(&self, res: &ResidentParams) -> Result<Optimizer> {
        let mut opt = self.opt.clone();
        for (name, (m, v)) in self.param_names().iter().zip(res.download_moments()?) {
            let st = opt.state_mut(name).ok_or_else(|| Error::Input(format!("parameter `{name}` is not registered with the optimizer")))?;
            (st.m, st.v) = (m, v);
        }
        Ok(opt)
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    pub fn is_done(&self) -> bool {
        self.step >= self.total_steps
    }

    /// The run's identity, stored in checkpoints and compared on resume.
    fn identity(&self) -> serde_json::Value {
        serde_json::json!({ "train": self.cfg, "trainable_tokens": self.trainable_tokens, "n_examples": self.n_examples })
    }

    /// What one micro-batch costs under `objective` against plain SFT, on the run's device and on
    /// the examples of its next micro-batch (peeked: the run's data order, random state and
    /// parameters are untouched): the median seconds of `reps` forward + backward passes of
    /// each, after one warm-up pass of each. ILRec's overhead over SFT is the ratio.
    pub fn time_against_sft(&self, model: &Model, data: &[Example], objective: &Objective, reps: usize) -> Result<StepCost> {
        self.check_data(data)?;
        let (ids, _, _) = examples_from(self.cfg.seed, self.n_examples, (self.epoch, self.cursor), self.cfg.micro_batch);
        for &i in &ids {
            data[i].check(i)?;
        }
        let tb = collate(data, &ids)?;
        let norm = tb.targets.len() as f64;
        let mut rng = Rng::new(self.cfg.seed ^ 0x5f7_c057);
        // On the GPU, the micro-batch a step runs: on a resident copy of the parameters (made
        // here, outside the timing; the run's own copy and state are not touched).
        let mut resident = match &self.gpu {
            Some(dm) => Some(self.upload_resident(dm, model)?),
            None => None,
        };
        let mut once = |obj: &Objective| -> Result<f64> {
            let t = Instant::now();
            match (&self.gpu, resident.as_mut()) {
                (Some(dm), Some(res)) => {
                    res.zero_grads()?;
                    forward_backward_resident(dm, model, &self.lora, res, &tb, obj, &self.trainable_tokens, norm, &mut rng)?;
                    // Wait for the device, so the time includes its work.
                    dm.cuda().sync()?;
                }
                _ => {
                    forward_backward(model, &self.lora, &tb, obj, &self.trainable_tokens, norm, true, &mut rng)?;
                }
            }
            Ok(t.elapsed().as_secs_f64())
        };
        let mut median = |obj: &Objective| -> Result<f64> {
            once(obj)?;
            let mut t = (0..reps.max(1)).map(|_| once(obj)).collect::<Result<Vec<f64>>>()?;
            t.sort_by(f64::total_cmp);
            Ok(t[t.len() / 2])
        };
        let objective_s = median(objective)?;
        let sft_s = median(&Objective::Sft)?;
        Ok(StepCost { objective_s, sft_s, tokens: tb.batch.num_real() })
    }

    fn check_data(&self, data: &[Example]) -> Result<()> {
        if data.len() != self.n_examples {
            return Err(Error::Input(format!("the run was set up for {} examples, got {}", self.n_examples, data.len())));
        }
        Ok(())
    }

    fn next_examples(&mut self, k: usize) -> Vec<usize> {
        let (ids, epoch, cursor) = examples_from(self.cfg.seed, self.n_examples, (self.epoch, self.cursor), k);
        (self.epoch, self.cursor) = (epoch, cursor);
        ids
    }

    /// One optimizer step over `grad_accum` micro-batches.
    pub fn train_step(&mut self, model: &mut Model, data: &[Example], objective: &Objective) -> Result<StepReport> {
        self.check_data(data)?;
        let started = Instant::now();
        let step_no = self.step + 1;
        let micro: Vec<Vec<usize>> = (0..self.cfg.grad_accum).map(|_| self.next_examples(self.cfg.micro_batch)).collect();
        for &i in micro.iter().flatten() {
            data[i].check(i)?;
        }
        // ILREC.md section 7: normalise by every response token of the accumulated batch.
        let response_tokens: usize = micro.iter().flatten().map(|&i| data[i].targets.len()).sum();
        // Two parameter groups: LoRA at lr, then the two token-row tensors at token_lr.
        let lr = self.schedule.lr_at(self.cfg.lr, self.step);
        let token_lr = self.schedule.lr_at(self.cfg.token_lr.unwrap_or(self.cfg.lr), self.step);
        let step = StepIn { micro: &micro, response_tokens, step_no, lr, token_lr };
        let (stats, grad_norm, tokens) = match self.gpu.is_some() {
            true => self.device_step(model, data, objective, &step)?,
            false => self.host_step(model, data, objective, &step)?,
        };
        self.write_rows(model)?;
        self.step = step_no;
        self.micro_step += self.cfg.grad_accum as u64;
        Ok(StepReport { step: step_no, total_steps: self.total_steps, lr, stats, grad_norm, tokens, response_tokens, seconds: started.elapsed().as_secs_f64() })
    }

    /// The micro-batches, gradients, clipping and AdamW of one step on the host; returns (loss
    /// statistics, gradient norm, tokens).
    fn host_step(&mut self, model: &Model, data: &[Example], objective: &Objective, step: &StepIn<'_>) -> Result<(LossStats, f32, usize)> {
        let StepIn { micro, response_tokens, step_no, lr, token_lr } = *step;
        let mut grads = Grads::zeros(model, &self.lora, self.trainable_tokens.len());
        let mut stats = LossStats::default();
        let mut tokens = 0;
        for ids in micro {
            let tb = collate(data, ids)?;
            tokens += tb.batch.num_real();
            let norm = response_tokens as f64;
            let (st, g) = forward_backward(model, &self.lora, &tb, objective, &self.trainable_tokens, norm, true, &mut self.rng)
                .map_err(|e| at_step(e, step_no))?;
            stats.accumulate(&st);
            let mut g = g;
            for (acc, x) in grads.tensors_mut().into_iter().zip(g.tensors_mut()) {
                acc.iter_mut().zip(x.iter()).for_each(|(a, b)| *a += b);
            }
        }
        let names: Vec<String> = self.param_names();
        let mut gts = grads.tensors_mut();
        if let Some((name, i)) = gts.iter().zip(&names).find_map(|(g, n)| g.iter().position(|x| !x.is_finite()).map(|i| (n.clone(), i))) {
            return Err(Error::NonFinite(format!("step {step_no}: gradient of `{name}` at element {i}")));
        }
        let mut slices: Vec<&mut [f32]> = gts.iter_mut().map(|g| g.as_mut_slice()).collect();
        let grad_norm = clip_grad_norm(&mut slices, self.cfg.max_grad_norm);
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite(format!("step {step_no}: gradient norm {grad_norm}")));
        }
        {
            let grads_ro: Vec<&[f32]> = gts.iter().map(|g| g.as_slice()).collect();
            let mut values: Vec<&mut Vec<f32>> = self.lora.named_mut().into_iter().map(|(_, t)| t).collect();
            values.push(&mut self.embed_rows);
            values.push(&mut self.head_rows);
            let mut params: Vec<ParamRef<'_>> = values
                .into_iter()
                .zip(&names)
                .zip(grads_ro)
                .map(|((v, name), grad)| ParamRef { name: name.as_str(), values: v.as_mut_slice(), grad, decay: true })
                .collect();
            let n_lora = params.len() - 2;
            let (lora, rows) = params.split_at_mut(n_lora);
            self.opt.step(lora, lr).map_err(|e| at_step(e, step_no))?;
            self.opt.step(rows, token_lr).map_err(|e| at_step(e, step_no))?;
        }
        Ok((stats, grad_norm, tokens))
    }

    /// [`Trainer::host_step`] on the GPU with the parameters resident there: the micro-batches
    /// add their adapter gradients into the device accumulators, the token-row gradients are
    /// summed on the host and uploaded once, then clipping and AdamW run on the device (the same
    /// f32 arithmetic as the host optimiser: `AdamWScalars` mirrors `Optimizer::step`), and the
    /// new values come back.
    fn device_step(&mut self, model: &Model, data: &[Example], objective: &Objective, step: &StepIn<'_>) -> Result<(LossStats, f32, usize)> {
        let StepIn { micro, response_tokens, step_no, lr, token_lr } = *step;
        let dm = self.gpu.as_ref().ok_or_else(|| Error::Input("device step without a GPU".into()))?;
        let names = self.param_names();
        if self.resident.is_none() {
            self.resident = Some(self.upload_resident(dm, model)?);
        }
        let res = self.resident.as_mut().ok_or_else(|| Error::Input("device parameters missing".into()))?;
        res.zero_grads()?;
        let mut embed_g = vec![0.0f32; self.embed_rows.len()];
        let mut head_g = vec![0.0f32; self.head_rows.len()];
        let mut stats = LossStats::default();
        let mut tokens = 0;
        for ids in micro {
            let tb = collate(data, ids)?;
            tokens += tb.batch.num_real();
            let (st, g) = forward_backward_resident(dm, model, &self.lora, res, &tb, objective, &self.trainable_tokens, response_tokens as f64, &mut self.rng)
                .map_err(|e| at_step(e, step_no))?;
            stats.accumulate(&st);
            embed_g.iter_mut().zip(&g.embed_rows).for_each(|(a, b)| *a += b);
            head_g.iter_mut().zip(&g.head_rows).for_each(|(a, b)| *a += b);
        }
        res.set_row_grads(&embed_g, &head_g)?;
        if let Some((i, e)) = res.first_nonfinite()? {
            return Err(Error::NonFinite(format!("step {step_no}: gradient of `{}` at element {e}", names[i])));
        }
        let n_lora = names.len() - 2;
        let scalars: Vec<AdamWScalars> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let step = self.opt.state(n).map_or(0, |s| s.step) + 1;
                AdamWScalars::from_config(&self.opt.config, if i < n_lora { lr } else { token_lr }, step, true)
            })
            .collect();
        let grad_norm = res.clip_and_step(self.cfg.max_grad_norm, &scalars).map_err(|e| at_step(e, step_no))?;
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite(format!("step {step_no}: gradient norm {grad_norm}")));
        }
        for n in &names {
            if let Some(st) = self.opt.state_mut(n) {
                st.step += 1;
            }
        }
        let mut values = res.download_values()?.into_iter();
        for (_, t) in self.lora.named_mut() {
            *t = values.next().ok_or_else(|| Error::Input("device parameters: too few tensors".into()))?;
        }
        self.embed_rows = values.next().ok_or_else(|| Error::Input("device parameters: no embedding rows".into()))?;
        self.head_rows = values.next().ok_or_else(|| Error::Input("device parameters: no head rows".into()))?;
        Ok((stats, grad_norm, tokens))
    }

    /// The host's parameters and AdamW moments as a device copy.
    fn upload_resident(&self, dm: &CudaModel, model: &Model) -> Result<ResidentParams> {
        let names = self.param_names();
        let states: Vec<&ParamState> = names.iter().map(|n| self.opt.state(n).ok_or_else(|| Error::Input(format!("parameter `{n}` is not registered with the optimizer")))).collect::<Result<_>>()?;
        let moments: Vec<(&[f32], &[f32])> = states.iter().map(|s| (s.m.as_slice(), s.v.as_slice())).collect();
        ResidentParams::upload(dm.cuda(), &self.lora, &self.embed_rows, &self.head_rows, model.config.hidden_size, &moments)
    }

    fn param_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lora.named().into_iter().map(|(n, _, _)| n).collect();
        names.push(EMBED_ROWS.into());
        names.push(HEAD_ROWS.into());
        names
    }

    /// Copies the trained token rows into the model (and its GPU copy).
    fn write_rows(&mut self, model: &mut Model) -> Result<()> {
        let h = model.config.hidden_size;
        for (i, &t) in self.trainable_tokens.iter().enumerate() {
            let t = t as usize;
            model.embed[t * h..(t + 1) * h].copy_from_slice(&self.embed_rows[i * h..(i + 1) * h]);
            if let Some(head) = model.lm_head.as_mut() {
                head.w[t * h..(t + 1) * h].copy_from_slice(&self.head_rows[i * h..(i + 1) * h]);
            }
        }
        if let Some(dm) = self.gpu.as_mut() {
            let head = model.lm_head.as_ref().map(|_| self.head_rows.as_slice());
            dm.write_token_rows(&self.trainable_tokens, &self.embed_rows, head)?;
        }
        Ok(())
    }

    /// Writes a checkpoint into `dir` (atomically; keeps the configured number).
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        let h = if self.trainable_tokens.is_empty() { 0 } else { self.embed_rows.len() / self.trainable_tokens.len() };
        let mut trainable: Vec<NamedTensor> = self.lora.named().into_iter().map(|(n, s, d)| (n, s, d.to_vec())).collect();
        trainable.push((EMBED_ROWS.into(), vec![self.trainable_tokens.len(), h], self.embed_rows.clone()));
        trainable.push((HEAD_ROWS.into(), vec![self.head_rows.len().checked_div(h).unwrap_or(0), h], self.head_rows.clone()));
        let ck = Checkpoint {
            step: self.step,
            micro_step: self.micro_step,
            epoch: self.epoch,
            data_cursor: self.cursor,
            rng: self.rng.state(),
            schedule: self.schedule,
            optimizer: self.opt.config,
            config: self.identity(),
            trainable,
            // The device's moments when the run keeps them there.
            optimizer_state: match &self.resident {
                Some(res) => self.optimizer_with(res)?.state_tensors(),
                None => self.opt.state_tensors(),
            },
        };
        checkpoint::save_checkpoint(dir, &ck, self.cfg.keep_checkpoints)
    }

    /// Restores the latest checkpoint of `dir` into this (freshly created) run; `false` when
    /// there is none. The checkpoint must come from a run with the same configuration.
    pub fn resume(&mut self, model: &mut Model, dir: &Path) -> Result<bool> {
        checkpoint::remove_stale_temp(dir)?;
        let Some(ck) = checkpoint::load_latest(dir)? else { return Ok(false) };
        let step_dir = checkpoint::latest_step_dir(dir)?.unwrap_or_else(|| dir.to_path_buf());
        if ck.config != self.identity() {
            return Err(Error::InvalidField {
                path: step_dir.join(checkpoint::STATE_FILE),
                field: "config".into(),
                msg: "the checkpoint belongs to a run with another configuration, data size or trainable tokens".into(),
            });
        }
        let file = step_dir.join(checkpoint::TRAINABLE_FILE);
        let find = |name: &str, len: usize| -> Result<Vec<f32>> {
            let t = ck.trainable.iter().find(|t| t.0 == name).ok_or_else(|| Error::MissingTensor { path: file.clone(), tensor: name.into() })?;
            if t.2.len() != len {
                return Err(Error::ShapeMismatch { path: file.clone(), tensor: name.into(), expected: vec![len], got: t.1.clone() });
            }
            Ok(t.2.clone())
        };
        // Everything is read and checked before anything is replaced.
        let lora_vals = self.lora.named().into_iter().map(|(n, _, d)| find(&n, d.len())).collect::<Result<Vec<_>>>()?;
        let embed_rows = find(EMBED_ROWS, self.embed_rows.len())?;
        let head_rows = find(HEAD_ROWS, self.head_rows.len())?;
        self.opt.load_state(&step_dir.join(checkpoint::OPTIMIZER_FILE), &ck.optimizer_state)?;
        for ((_, t), v) in self.lora.named_mut().into_iter().zip(lora_vals) {
            *t = v;
        }
        self.embed_rows = embed_rows;
        self.head_rows = head_rows;
        self.step = ck.step;
        self.micro_step = ck.micro_step;
        self.epoch = ck.epoch;
        self.cursor = ck.data_cursor;
        self.rng = Rng::from_state(ck.rng);
        // The device copy is rebuilt from the restored host state at the next step.
        self.resident = None;
        self.write_rows(model)?;
        Ok(true)
    }
}

/// What both step paths take: the micro-batches' examples, the response tokens of the whole
/// accumulated batch (the loss normaliser), the step's number and its two learning rates.
#[derive(Clone, Copy)]
struct StepIn<'a> {
    micro: &'a [Vec<usize>],
    response_tokens: usize,
    step_no: u64,
    lr: f64,
    token_lr: f64,
}

fn at_step(e: Error, step: u64) -> Error {
    match e {
        Error::NonFinite(m) => Error::NonFinite(format!("step {step}: {m}")),
        other => other,
    }
}

/// Right-pads the examples `ids` into one batch with their loss rows.
fn collate(data: &[Example], ids: &[usize]) -> Result<TrainBatch> {
    let seqs: Vec<Vec<u32>> = ids.iter().map(|&i| data[i].tokens.clone()).collect();
    let batch = Batch::right_padded(&seqs, 0)?;
    let t = batch.seq;
    let mut tb = TrainBatch { batch, positions: vec![], targets: vec![], item_mask: vec![], rewards: None };
    let with_rewards = ids.iter().any(|&i| data[i].rewards.is_some());
    let mut rewards = Vec::new();
    for (b, &i) in ids.iter().enumerate() {
        let ex = &data[i];
        tb.positions.extend(ex.loss_positions.iter().map(|&p| b * t + p));
        tb.targets.extend_from_slice(&ex.targets);
        tb.item_mask.extend_from_slice(&ex.item_mask);
        if with_rewards {
            let r = ex.rewards.as_ref().ok_or_else(|| Error::Input(format!("training example {i} has no CF rewards while others do")))?;
            rewards.extend_from_slice(r);
        }
    }
    if with_rewards {
        tb.rewards = Some(rewards);
    }
    Ok(tb)
}

/// Runs (or resumes, when `checkpoint_dir` holds a checkpoint of the same run) a whole training
/// run, calling `on_step` after every optimizer step. On a non-finite loss or gradient the run
/// stops with the error; the last good checkpoint stays in place.
pub fn train(
    model: &mut Model,
    data: &[Example],
    cfg: TrainConfig,
    objective: &Objective,
    trainable_tokens: Vec<u32>,
    checkpoint_dir: Option<&Path>,
    mut on_step: impl FnMut(&StepReport),
) -> Result<Trainer> {
    let mut tr = Trainer::new(model, cfg, data.len(), trainable_tokens)?;
    if let Some(dir) = checkpoint_dir {
        tr.resume(model, dir)?;
    }
    while !tr.is_done() {
        let rep = tr.train_step(model, data, objective)?;
        on_step(&rep);
        if let Some(dir) = checkpoint_dir {
            let every = tr.cfg.checkpoint_every;
            if (every > 0 && tr.step % every == 0) || tr.is_done() {
                tr.save(dir)?;
            }
        }
    }
    Ok(tr)
}
