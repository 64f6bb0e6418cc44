//! Checks of the fused loss (kernels/loss.cu through `ops::loss::LossPlan`) against
//! engine/train/loss.rs: `sft_loss` / `ilrec_loss` on the logits the CPU computes from the same
//! bf16-rounded normed rows and LM head, then `d_final · W` for the normed-row gradient and the
//! trainable columns of `d_final`. Rows with target NONE (ignored) are left out of the reference
//! and must come back with zero gradients. Cases: odd sizes, outliers, ILRec with every switch,
//! a row whose V_N is empty, a batch whose rows are all ignored, a SmolLM2-sized vocabulary.
use super::{random_outliers, round_bf16, Checker, TOL_BF16};
use crate::rng::Rng;
use crate::backend::cpu::{matmul_nn, matmul_nt};
use crate::backend::cuda::ops::loss::{IlrecInputs, LossPlan, NONE};
use crate::backend::cuda::{DeviceTensor, Elem};
use crate::error::Result;
use crate::train::loss::{ilrec_loss, sft_loss, CpdDirection, IlrecParams, LossRows, LossStats, NegSource, NegWeight};

/// One case's shape and switches.
#[derive(Clone, Copy)]
pub struct Case {
    pub m: usize,
    pub h: usize,
    pub vocab: usize,
    /// Candidates (0: SFT).
    pub s: usize,
    pub k: usize,
    pub ntrain: usize,
    pub params: IlrecParams,
    /// Every row ignored.
    pub all_ignored: bool,
}

/// Host inputs of a case and the CPU reference outputs (ignored rows: zero gradients).
pub struct Data {
    pub normed: Vec<f32>,
    pub head: Vec<f32>,
    pub targets: Vec<u32>,
    pub item: Vec<bool>,
    pub candidates: Vec<u32>,
    pub trainable: Vec<u32>,
    pub probe: Vec<f32>,
    pub rewards: Vec<f32>,
    pub norm: f64,
    pub stats: LossStats,
    pub dnormed: Vec<f32>,
    pub dtrain: Vec<f32>,
    pub dprobe: Vec<f32>,
}

/// `n` distinct ids below `bound` in a scrambled order.
fn distinct(rng: &mut Rng, n: usize, bound: usize) -> Vec<u32> {
    let mut all: Vec<u32> = (0..bound as u32).collect();
    for i in 0..n.min(bound) {
        let j = i + rng.below(bound - i);
        all.swap(i, j);
    }
    all.truncate(n);
    all
}

/// Random inputs for `cs` and the CPU reference on them: shared by the self-test and
/// tests/loss_emu.rs (which runs the kernels on the emulator with other split sizes).
pub fn make(rng: &mut Rng, cs: Case) -> Result<Data> {
    let Case { m, h, vocab, s, k, ntrain, params, all_ignored } = cs;
    let normed = round_bf16(&random_outliers(rng, m * h, 1.0));
    // Outliers in the rows only: outliers on both sides give logit gaps past f64's exp range, where
    // the reverse KL is infinite on the CPU too.
    let hs = 2.0 / (h as f32).sqrt();
    let head = round_bf16(&(0..vocab * h).map(|_| rng.normal() * hs).collect::<Vec<f32>>());
    let candidates = distinct(rng, s, vocab);
    let mut item = vec![false; m];
    let mut targets: Vec<u32> = (0..m).map(|_| rng.below(vocab) as u32).collect();
    if s > 0 {
        for r in 0..m {
            if rng.below(3) != 0 {
                item[r] = true;
                targets[r] = candidates[rng.below(s)];
            }
        }
    }
    for r in (0..m).step_by(7).skip(1) {
        targets[r] = NONE;
    }
    if all_ignored {
        targets.fill(NONE);
    }
    let mut probe = random_outliers(rng, k * m * s, 2.0);
    // Row 0, when it is an item row: the target tops every probe, so V_N is empty (alpha >= 1).
    if s > 0 && item[0] && targets[0] != NONE {
        let jy = candidates.iter().position(|&x| x == targets[0]).expect("item target is a candidate");
        for l in 0..k {
            probe[(l * m) * s + jy] += 40.0;
        }
    }
    let rewards = random_outliers(rng, m * s, 1.0);
    let mut trainable = distinct(rng, ntrain, vocab);
    // Some trainable tokens among the candidates, as the item tokens are in training.
    for (i, &x) in candidates.iter().take(ntrain / 2).enumerate() {
        if !trainable.contains(&x) {
            trainable[i] = x;
        }
    }
    let kept: Vec<usize> = (0..m).filter(|&r| targets[r] != NONE).collect();
    let norm = kept.len() as f64 + 3.0;

    let mut logits = vec![0.0f32; m * vocab];
    matmul_nt(&mut logits, vocab, &normed, h, &head, h, m, vocab, h, false);
    let pick = |x: &[f32], w: usize| -> Vec<f32> { kept.iter().flat_map(|&r| x[r * w..(r + 1) * w].iter().copied()).collect() };
    let kl = pick(&logits, vocab);
    let kt: Vec<u32> = kept.iter().map(|&r| targets[r]).collect();
    let (stats, d_final, d_probe) = if kept.is_empty() {
        (LossStats::default(), vec![], vec![])
    } else if s == 0 {
        let (st, d) = sft_loss(&kl, vocab, &kt, norm)?;
        (st, d, vec![])
    } else {
        let layers: Vec<Vec<f32>> = (0..k).map(|l| pick(&probe[l * m * s..(l + 1) * m * s], s)).collect();
        let refs: Vec<&[f32]> = layers.iter().map(Vec::as_slice).collect();
        let ki: Vec<bool> = kept.iter().map(|&r| item[r]).collect();
        let kr = pick(&rewards, s);
        let rows = LossRows { final_logits: &kl, vocab, targets: &kt, item_mask: &ki, probe_logits: &refs, candidates: &candidates, rewards: Some(&kr) };
        let (st, g) = ilrec_loss(&rows, &params, norm)?;
        (st, g.d_final, g.d_probe)
    };
    let mut dnormed = vec![0.0f32; m * h];
    let mut dtrain = vec![0.0f32; m * ntrain];
    let mut dprobe = vec![0.0f32; k * m * s];
    if !kept.is_empty() {
        let mut dn = vec![0.0f32; kept.len() * h];
        matmul_nn(&mut dn, h, &d_final, vocab, &head, h, kept.len(), h, vocab, false);
        for (i, &r) in kept.iter().enumerate() {
            dnormed[r * h..(r + 1) * h].copy_from_slice(&dn[i * h..(i + 1) * h]);
            for (j, &tok) in trainable.iter().enumerate() {
                dtrain[r * ntrain + j] = d_final[i * vocab + tok as usize];
            }
            for l in 0..k {
                dprobe[(l * m + r) * s..(l * m + r + 1) * s].copy_from_slice(&d_probe[l][i * s..(i + 1) * s]);
            }
        }
    }
    Ok(Data { normed, head, targets, item, candidates, trainable, probe, rewards, norm, stats, dnormed, dtrain, dprobe })
}

fn stat_vec(s: &LossStats) -> Vec<f32> {
    [s.loss, s.cpo, s.cpd, s.crr, s.ce].iter().map(|&v| v as f32).collect()
}

pub(super) fn check(c: &mut Checker) -> Result<()> {
    let p = IlrecParams::default();
    let sft = |m, h, vocab, ntrain| Case { m, h, vocab, s: 0, k: 0, ntrain, params: p, all_ignored: false };
    let ilrec = |m, h, vocab, s, k, params| Case { m, h, vocab, s, k, ntrain: 13, params, all_ignored: false };
    let cases = [
        (sft(37, 96, 1000, 9), "SFT"),
        (sft(130, 576, 49_152, 0), "SFT, no trainable rows"),
        (ilrec(37, 96, 1001, 61, 3, p), "ILRec defaults"),
        (ilrec(29, 80, 257, 52, 2, IlrecParams { alpha: 0.5, neg_weight: NegWeight::Logit, cpd_direction: CpdDirection::Reverse, ..p }), "ILRec alpha 0.5, logit w, reverse KL"),
        (ilrec(23, 96, 301, 61, 4, IlrecParams { negatives: NegSource::Final, mu: 0.0, ..p }), "ILRec final-layer negatives, mu 0"),
        (ilrec(130, 576, 49_152, 1024, 4, p), "ILRec SmolLM2 vocabulary"),
        (Case { all_ignored: true, ..ilrec(17, 96, 1000, 61, 3, p) }, "ILRec, all rows ignored"),
    ];
    for (cs, label) in cases {
        case(c, cs, label)?;
    }
    Ok(())
}

fn case(c: &mut Checker, cs: Case, label: &str) -> Result<()> {
    let cuda = c.cuda;
    let d = make(&mut c.rng, cs)?;
    let Case { m, h, vocab, s, k, .. } = cs;
    let shape = format!("{label}: m {m}, h {h}, V {vocab}, S {s}, k {k}");
    let normed = DeviceTensor::from_f32_in(cuda, &[m, h], &d.normed, Elem::BF16, "normed rows")?;
    let head = DeviceTensor::from_f32_in(cuda, &[vocab, h], &d.head, Elem::BF16, "head")?;
    let probe = DeviceTensor::from_f32(cuda, &[k, m, s], &d.probe, "probe logits")?;
    let rewards = DeviceTensor::from_f32(cuda, &[m, s], &d.rewards, "rewards")?;
    let ilrec_idx = (s > 0).then_some((d.item.as_slice(), d.candidates.as_slice()));
    let plan = LossPlan::new(cuda, vocab, &d.targets, ilrec_idx, &d.trainable)?;
    let inputs = IlrecInputs { params: cs.params, probe: &probe, rewards: Some(&rewards) };
    let il = (s > 0).then_some(&inputs);
    cuda.reset_peak();
    let before = cuda.memory().in_use;
    let out = plan.run(cuda, &normed, &head, il, d.norm)?;
    let extra = cuda.memory().peak_in_use.saturating_sub(before);
    let ms = c.time(3, || plan.run(cuda, &normed, &head, il, d.norm).map(|_| ()))?;
    let kernel = "loss (fused)";
    c.record(kernel, format!("{shape}: loss terms"), &stat_vec(&out.stats), &stat_vec(&d.stats), TOL_BF16, ms);
    c.record(kernel, format!("{shape}: d normed rows"), &out.dnormed.to_f32_vec()?, &d.dnormed, TOL_BF16, ms);
    if let Some(t) = &out.dtrain {
        c.record(kernel, format!("{shape}: d trainable columns"), &t.to_f32_vec()?, &d.dtrain, TOL_BF16, ms);
    }
    if let Some(p) = &out.dprobe {
        c.record(kernel, format!("{shape}: d probe logits"), &p.to_f32_vec()?, &d.dprobe, TOL_BF16, ms);
    }
    if s > 0 {
        let counts = |st: &LossStats| vec![st.item_rows as f32, st.negatives as f32];
        c.record(kernel, format!("{shape}: item rows, |V_N| total"), &counts(&out.stats), &counts(&d.stats), TOL_BF16, ms);
    }
    if vocab < 10_000 {
        return Ok(());
    }
    // Extra memory against the m x V f32 logits (plus their gradient) of the unfused path: the
    // row passes while the fused path needs less.
    let unfused = 2 * 4 * m * vocab;
    c.record(kernel, format!("{shape}: extra memory {extra} B vs {unfused} B unfused (ratio)"), &[(extra as f64 / unfused as f64) as f32], &[0.0], 1.0, ms);
    Ok(())
}
