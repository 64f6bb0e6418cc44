//! Launchers for kernels/loss.cu and the pipeline that runs them: the final-layer loss of a
//! micro-batch's response rows (SFT cross-entropy, or ILRec's L_CPO + mu L_CRR with the L_CPD
//! bookkeeping) and its gradients w.r.t. the normed hidden rows, the trainable LM-head columns and
//! the probe logits, streaming the vocabulary so the `m x V` logits never exist.
//! CPU reference: engine/train/loss.rs (`sft_loss`, `ilrec_loss`) on `normed · W_head^T`.
//!
//! Extra device memory of one [`LossPlan::run`] (docs/kernels/loss.md): `O(m (S (3 + 2k) + h +
//! ntrain))` f32 plus one bf16 gradient chunk of at most [`CHUNK_BYTES`], and two `[V]` u32 maps:
//! nothing of size `m x V`.
use super::{bad, expect_elem, expect_len, launch, u32_of, Ops};
use crate::backend::cuda::{Arg, Cuda, DeviceTensor, Elem, Launch, MAX_GRID_YZ};
use crate::error::{Error, Result};
use crate::train::loss::{CpdDirection, IlrecParams, LossStats, NegSource, NegWeight};

const STEM: &str = "loss";

/// The id of "none": an ignored row's target, a column that is not a candidate, a token that is
/// not trained.
pub const NONE: u32 = u32::MAX;

/// Rows / columns per tile of the streaming kernels.
const TILE: usize = 64;

/// Blocks pass 1 aims for (a few waves of a 132-SM GPU): the vocabulary is split until the row
/// tiles times the splits reach it.
const TARGET_BLOCKS: usize = 528;

/// Budget of the bf16 logit-gradient chunk of the backward, bytes: bounds the extra memory
/// independently of the vocabulary.
pub const CHUNK_BYTES: usize = 32 << 20;

/// Indices checked on the host against the table they index (`< bound`, or [`NONE`] where
/// allowed) and uploaded: the kernels read with them unchecked.
#[derive(Debug)]
pub struct Ids {
    ids: DeviceTensor,
    bound: usize,
}

impl Ids {
    /// Checks `ids` against `bound` (`allow_none`: [`NONE`] passes too) and uploads them.
    pub fn new(cuda: &Cuda, ids: &[u32], bound: usize, allow_none: bool, what: &str) -> Result<Ids> {
        if let Some(i) = ids.iter().position(|&v| (v as usize) >= bound && !(allow_none && v == NONE)) {
            return Err(Error::Input(format!("{what}: entry {i} = {} is outside 0..{bound}", ids[i])));
        }
        Ok(Ids { ids: DeviceTensor::from_u32(cuda, &[ids.len()], ids, what)?, bound })
    }
    pub fn len(&self) -> usize {
        self.ids.numel()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// What the entries were checked against.
    pub fn bound(&self) -> usize {
        self.bound
    }
    pub fn tensor(&self) -> &DeviceTensor {
        &self.ids
    }
}

/// `map[tokens[i]] = i` over a vocabulary of `vocab` ids, [`NONE`] elsewhere (`[vocab]` u32 on the
/// device); a token listed twice or outside the vocabulary is an error.
fn vocab_map(cuda: &Cuda, vocab: usize, tokens: &[u32], what: &str) -> Result<(Vec<u32>, DeviceTensor)> {
    let mut map = vec![NONE; vocab];
    for (i, &t) in tokens.iter().enumerate() {
        let Some(slot) = map.get_mut(t as usize) else {
            return Err(Error::Input(format!("{what}: token {t} is outside the vocabulary ({vocab})")));
        };
        if *slot != NONE {
            return Err(Error::Input(format!("{what}: token {t} is listed twice")));
        }
        *slot = i as u32;
    }
    let d = DeviceTensor::from_u32(cuda, &[vocab], &map, what)?;
    Ok((map, d))
}

/// The ILRec side of a plan: candidate columns and item rows.
struct Cand {
    s: usize,
    colmap: DeviceTensor,
    tcol: DeviceTensor,
    item: DeviceTensor,
}

/// The host-checked, uploaded index data of one micro-batch's loss rows (targets, item rows,
/// candidates, trainable tokens): built once, used by [`LossPlan::run`].
pub struct LossPlan {
    m: usize,
    vocab: usize,
    targets: Ids,
    host_targets: Vec<u32>,
    host_item: Vec<bool>,
    cand: Option<Cand>,
    train: Option<(DeviceTensor, usize)>,
}

/// The ILRec inputs of [`LossPlan::run`].
pub struct IlrecInputs<'a> {
    pub params: IlrecParams,
    /// Probe logits of the `k` probed blocks over the candidates, `[k, m, S]` f32.
    pub probe: &'a DeviceTensor,
    /// CF rewards `[m, S]` f32 (required when `mu > 0`).
    pub rewards: Option<&'a DeviceTensor>,
}

/// What [`LossPlan::run`] returns; every loss and gradient is already divided by `norm`.
pub struct LossOut {
    pub stats: LossStats,
    /// `dL/d normed` `[m, h]` f32 (the final-norm output rows).
    pub dnormed: DeviceTensor,
    /// `dL/dz` at the trainable tokens' columns, `[m, ntrain]` f32 (`None` without trainable tokens).
    pub dtrain: Option<DeviceTensor>,
    /// `dL/dz^l` of the probe logits, `[k, m, S]` f32 (ILRec only).
    pub dprobe: Option<DeviceTensor>,
}

impl LossPlan {
    /// Checks and uploads the rows' index data. `targets` `[m]` (< vocab, or [`NONE`] for a row
    /// without loss); for ILRec `item_mask` `[m]` and `candidates` `[S]` (distinct, < vocab; an
    /// item row's target must be one); `trainable` are the tokens whose LM-head columns get
    /// gradients (distinct, < vocab).
    pub fn new(cuda: &Cuda, vocab: usize, targets: &[u32], ilrec: Option<(&[bool], &[u32])>, trainable: &[u32]) -> Result<LossPlan> {
        if vocab == 0 || vocab >= NONE as usize {
            return Err(Error::Input(format!("fused loss: vocabulary of {vocab} ids is not supported")));
        }
        let m = targets.len();
        let t = Ids::new(cuda, targets, vocab, true, "loss targets")?;
        let (cand, host_item) = match ilrec {
            None => (None, vec![false; m]),
            Some((item, cands)) => {
                if item.len() != m {
                    return Err(Error::Input(format!("fused loss: item mask has {} rows, expected {m}", item.len())));
                }
                if cands.is_empty() {
                    return Err(Error::Input("ILRec loss: needs at least one candidate token".into()));
                }
                let (map, colmap) = vocab_map(cuda, vocab, cands, "ILRec candidates")?;
                let tcol: Vec<u32> = targets.iter().map(|&y| if y == NONE { NONE } else { map[y as usize] }).collect();
                if let Some(r) = (0..m).find(|&r| item[r] && targets[r] != NONE && tcol[r] == NONE) {
                    return Err(Error::Input(format!("ILRec loss: row {r} is an item row but its target {} is not a candidate token", targets[r])));
                }
                let flags: Vec<u8> = item.iter().map(|&b| b as u8).collect();
                let c = Cand {
                    s: cands.len(),
                    colmap,
                    tcol: DeviceTensor::from_u32(cuda, &[m], &tcol, "target candidate columns")?,
                    item: DeviceTensor::from_u8(cuda, &[m], &flags, "item-row flags")?,
                };
                (Some(c), item.to_vec())
            }
        };
        let train = if trainable.is_empty() { None } else { Some((vocab_map(cuda, vocab, trainable, "trainable tokens")?.1, trainable.len())) };
        Ok(LossPlan { m, vocab, targets: t, host_targets: targets.to_vec(), host_item, cand, train })
    }

    /// Candidate count (0 without ILRec).
    pub fn candidates(&self) -> usize {
        self.cand.as_ref().map_or(0, |c| c.s)
    }

    /// Extra device bytes [`LossPlan::run`] allocates for `h` and `k` probed layers (outputs
    /// included), for the memory tables: independent of the vocabulary but for the two maps.
    pub fn workspace_bytes(&self, h: usize, k: usize) -> usize {
        let (m, s) = (self.m, self.candidates());
        let (splits, _) = splits(m, self.vocab);
        let (_, ldz) = chunk(m, self.vocab);
        let ntrain = self.train.as_ref().map_or(0, |t| t.1);
        4 * (2 * splits * m + 4 * m + s * m * 3 + k * m * s + m * h + m * ntrain) + 8 * 3 * m + 8 * m + 2 * m * ldz + 4 * 2 * self.vocab
    }

    /// Runs the loss on `normed` (`[m, h]` bf16, the final-norm output rows rounded for the GEMM;
    /// h % 8 == 0) against `head` (`[V, h]` bf16). `ilrec` must be given exactly when the plan was
    /// built with candidates. `norm` is the response-token count of the accumulated batch.
    ///
    /// The logits are not checked for finiteness (they are never stored): a non-finite logit shows
    /// up as a non-finite loss, which the caller checks.
    pub fn run(&self, cuda: &Cuda, normed: &DeviceTensor, head: &DeviceTensor, ilrec: Option<&IlrecInputs<'_>>, norm: f64) -> Result<LossOut> {
        const K1: &str = "loss_lse_bf16";
        let (m, v) = (self.m, self.vocab);
        let mut all: Ops = vec![("normed", normed), ("head", head), ("targets", self.targets.tensor())];
        if let Some(i) = ilrec {
            all.push(("probe", i.probe));
            if let Some(r) = i.rewards {
                all.push(("rewards", r));
            }
        }
        expect_elem(K1, "normed", normed, &[Elem::BF16], &all)?;
        expect_elem(K1, "head", head, &[Elem::BF16], &all)?;
        let h = match head.shape() {
            [hv, h] if *hv == v => *h,
            s => return Err(bad(K1, &all, format!("head must be [{v}, h], got {s:?}"))),
        };
        if h == 0 || h % 8 != 0 {
            return Err(bad(K1, &all, format!("hidden size {h} must be a positive multiple of 8 (16-byte row loads)")));
        }
        expect_len(K1, "normed", normed, m * h, &all)?;
        if !(norm > 0.0 && norm.is_finite()) {
            return Err(bad(K1, &all, format!("normaliser must be positive, got {norm}")));
        }
        let s = self.candidates();
        let (k, params) = match (ilrec, &self.cand) {
            (None, None) => (0, None),
            (Some(i), Some(_)) => {
                let p = i.params;
                #[allow(clippy::neg_cmp_op_on_partial_ord)]
                let badp = !(p.alpha > 0.0) || !(p.beta >= 0.0) || !(p.lambda >= 0.0) || !(p.mu >= 0.0);
                if badp {
                    return Err(Error::Input(format!("ILRec loss: need alpha > 0 and beta, lambda, mu >= 0; got {p:?}")));
                }
                expect_elem(K1, "probe", i.probe, &[Elem::F32], &all)?;
                let k = match i.probe.shape() {
                    [k, pm, ps] if *k >= 1 && *pm == m && *ps == s => *k,
                    _ => return Err(bad(K1, &all, format!("probe logits must be [k >= 1, {m}, {s}]"))),
                };
                match i.rewards {
                    Some(r) => {
                        expect_elem(K1, "rewards", r, &[Elem::F32], &all)?;
                        expect_len(K1, "rewards", r, m * s, &all)?;
                    }
                    None if p.mu > 0.0 => return Err(Error::Input("ILRec loss: mu > 0 needs per-position CF rewards".into())),
                    None => {}
                }
                (k, Some(p))
            }
            _ => return Err(bad(K1, &all, "ILRec inputs must be given exactly when the plan has candidates")),
        };
        let dnormed = DeviceTensor::empty(cuda, &[m, h], Elem::F32, "loss: normed-row gradients")?;
        let dtrain = match &self.train {
            Some((_, nt)) => Some(DeviceTensor::empty(cuda, &[m, *nt], Elem::F32, "loss: trainable-column gradients")?),
            None => None,
        };
        let dprobe = if k > 0 { Some(DeviceTensor::empty(cuda, &[k, m, s], Elem::F32, "loss: probe-logit gradients")?) } else { None };
        let mut out = LossOut { stats: LossStats::default(), dnormed, dtrain, dprobe };
        if m == 0 {
            return Ok(out);
        }
        let row_tiles = u32_of(K1, "row tiles", m.div_ceil(TILE), &all)?;
        if row_tiles > i32::MAX as u32 {
            return Err(bad(K1, &all, "too many rows for grid.x"));
        }
        let mu32 = m as u32;
        let (v32, h32, s32) = (v as u32, h as u32, s as u32);
        let null = 0u64;
        let cand_ptr = |f: fn(&Cand) -> u64| self.cand.as_ref().map_or(null, f);

        // Pass 1: log-sum-exp partials, z[y], candidate logits.
        let (splits, tps) = splits(m, v);
        let pmax = DeviceTensor::empty(cuda, &[splits, m], Elem::F32, "loss: partial max")?;
        let psum = DeviceTensor::empty(cuda, &[splits, m], Elem::F32, "loss: partial sum")?;
        let zy = DeviceTensor::zeros(cuda, &[m], Elem::F32, "loss: target logits")?;
        let zc = DeviceTensor::empty(cuda, &[m, s], Elem::F32, "loss: candidate logits")?;
        let cfg = Launch { grid: (row_tiles, splits as u32, 1), block: (128, 1, 1), shared_bytes: 0 };
        let args = [
            Arg::Ptr(pmax.ptr()),
            Arg::Ptr(psum.ptr()),
            Arg::Ptr(zy.ptr()),
            Arg::Ptr(if s > 0 { zc.ptr() } else { null }),
            Arg::Ptr(normed.ptr()),
            Arg::Ptr(head.ptr()),
            Arg::Ptr(self.targets.tensor().ptr()),
            Arg::Ptr(cand_ptr(|c| c.colmap.ptr())),
            Arg::U32(mu32),
            Arg::U32(v32),
            Arg::U32(h32),
            Arg::U32(s32),
            Arg::U32(tps as u32),
        ];
        // SAFETY: loss_lse_bf16's signature; normed [m, h] and head [V, h] bf16 with h % 8 == 0;
        // pmax/psum [splits, m], zy [m], zc [m, S] f32; targets < V or NONE and colmap entries
        // < S or NONE (LossPlan::new checked both); splits * tps tiles cover V.
        unsafe { launch(cuda, STEM, K1, cfg, &args, &all)? };

        // Pass 2: per-row statistics and the ILRec selection.
        const K2: &str = "loss_rows";
        let lse_s = DeviceTensor::empty(cuda, &[m], Elem::F32, "loss: CPO log-sum-exp")?;
        let lse_z = DeviceTensor::empty(cuda, &[m], Elem::F32, "loss: log-sum-exp")?;
        let crr_w = DeviceTensor::empty(cuda, &[m], Elem::F32, "loss: CRR weight")?;
        let mult = DeviceTensor::empty(cuda, &[m, s], Elem::F32, "loss: negative multipliers")?;
        let qh = DeviceTensor::empty(cuda, &[m, s], Elem::F32, "loss: CRR soft labels")?;
        let rows = DeviceTensor::empty(cuda, &[m, 3], Elem::F64, "loss: row losses")?;
        let counts = DeviceTensor::empty(cuda, &[m, 2], Elem::U32, "loss: row negative counts")?;
        let p = params.unwrap_or_default();
        let flags = row_flags(&p);
        let sp = |t: &DeviceTensor| if s > 0 { t.ptr() } else { null };
        let args = [
            Arg::Ptr(lse_s.ptr()),
            Arg::Ptr(lse_z.ptr()),
            Arg::Ptr(crr_w.ptr()),
            Arg::Ptr(sp(&mult)),
            Arg::Ptr(sp(&qh)),
            Arg::Ptr(out.dprobe.as_ref().map_or(null, |d| d.ptr())),
            Arg::Ptr(rows.ptr()),
            Arg::Ptr(counts.ptr()),
            Arg::Ptr(pmax.ptr()),
            Arg::Ptr(psum.ptr()),
            Arg::Ptr(zy.ptr()),
            Arg::Ptr(sp(&zc)),
            Arg::Ptr(ilrec.map_or(null, |i| i.probe.ptr())),
            Arg::Ptr(ilrec.and_then(|i| i.rewards).map_or(null, |r| r.ptr())),
            Arg::Ptr(self.targets.tensor().ptr()),
            Arg::Ptr(cand_ptr(|c| c.tcol.ptr())),
            Arg::Ptr(cand_ptr(|c| c.item.ptr())),
            Arg::U32(mu32),
            Arg::U32(s32),
            Arg::U32(k as u32),
            Arg::U32(splits as u32),
            Arg::F64(p.alpha as f64),
            Arg::F64(p.beta as f64),
            Arg::F64(p.lambda as f64),
            Arg::F64(p.mu as f64),
            Arg::F64(1.0 / norm),
            Arg::U32(flags),
        ];
        // SAFETY: loss_rows's signature; one block per row r < m reads row r of every [m, ..]
        // operand and column r of the [splits, m] partials; S = 0 means no candidate operand is
        // read (item rows need S > 0); an item row's tcol is a valid column (LossPlan::new).
        unsafe { launch(cuda, STEM, K2, Launch::rows(m, 256), &args, &all)? };

        // Pass 3: per vocabulary chunk, dL/dz then d(normed).
        const K3: &str = "loss_dlogits_bf16";
        const K4: &str = "loss_dhidden_bf16";
        let (vc_max, ldz_max) = chunk(m, v);
        let dz = DeviceTensor::empty(cuda, &[m, ldz_max], Elem::BF16, "loss: logit-gradient chunk")?;
        let h_tiles = h.div_ceil(TILE);
        if h_tiles > MAX_GRID_YZ {
            return Err(bad(K4, &all, format!("hidden size {h} needs more than {MAX_GRID_YZ} column tiles")));
        }
        let (nt, slot_ptr, dtrain_ptr) = match (&self.train, &out.dtrain) {
            (Some((map, nt)), Some(d)) => (*nt as u32, map.ptr(), d.ptr()),
            _ => (0, null, null),
        };
        let mut c0 = 0usize;
        while c0 < v {
            let vc = vc_max.min(v - c0);
            let ldz = vc.next_multiple_of(8);
            let cfg = Launch { grid: (row_tiles, ldz.div_ceil(TILE) as u32, 1), block: (128, 1, 1), shared_bytes: 0 };
            let args = [
                Arg::Ptr(dz.ptr()),
                Arg::Ptr(dtrain_ptr),
                Arg::Ptr(normed.ptr()),
                Arg::Ptr(head.ptr()),
                Arg::Ptr(self.targets.tensor().ptr()),
                Arg::Ptr(cand_ptr(|c| c.colmap.ptr())),
                Arg::Ptr(slot_ptr),
                Arg::Ptr(lse_s.ptr()),
                Arg::Ptr(lse_z.ptr()),
                Arg::Ptr(crr_w.ptr()),
                Arg::Ptr(sp(&mult)),
                Arg::Ptr(sp(&qh)),
                Arg::U32(mu32),
                Arg::U32(v32),
                Arg::U32(h32),
                Arg::U32(s32),
                Arg::U32(nt),
                Arg::U32(c0 as u32),
                Arg::U32(vc as u32),
                Arg::U32(ldz as u32),
                Arg::F32((1.0 / norm) as f32),
            ];
            // SAFETY: loss_dlogits_bf16's signature; dz holds m * ldz_max >= m * ldz bf16; the
            // head rows read are < c0 + vc <= V; dtrain [m, ntrain] with slot entries < ntrain;
            // candidate operands [m, S] read at colmap entries < S.
            unsafe { launch(cuda, STEM, K3, cfg, &args, &all)? };
            let cfg = Launch { grid: (row_tiles, h_tiles as u32, 1), block: (128, 1, 1), shared_bytes: 0 };
            let args = [
                Arg::Ptr(out.dnormed.ptr()),
                Arg::Ptr(dz.ptr()),
                Arg::Ptr(head.ptr() + (c0 * h * 2) as u64),
                Arg::U32(mu32),
                Arg::U32(h32),
                Arg::U32(vc as u32),
                Arg::U32(ldz as u32),
                Arg::U32((c0 > 0) as u32),
            ];
            // SAFETY: loss_dhidden_bf16's signature; dnormed [m, h] f32; dz [m, ldz] bf16 (the
            // chunk just written); the head pointer is row c0 of [V, h] bf16 and rows >= vc are
            // not read, so every read row is < V.
            unsafe { launch(cuda, STEM, K4, cfg, &args, &all)? };
            c0 += vc;
        }

        // Statistics, summed on the host in row order as ilrec_loss does.
        out.stats = row_stats(&rows.to_f64_vec()?, &counts.to_u32_vec()?, &self.host_targets, &self.host_item, self.cand.is_some(), &p, norm);
        Ok(out)
    }
}

/// The `flags` argument of `loss_rows` for these ILRec options (see the kernel).
pub fn row_flags(p: &IlrecParams) -> u32 {
    (p.neg_weight == NegWeight::Logit) as u32 | ((p.cpd_direction == CpdDirection::Reverse) as u32) << 1 | ((p.negatives == NegSource::Final) as u32) << 2
}

/// The batch's loss terms from `loss_rows`' per-row sums, added on the host in row order as
/// `ilrec_loss` does and divided by `norm`: `rows` `[m, 3]` (CPO, CPD, CRR of an item row when the
/// plan has candidates; otherwise CE in the first slot), `counts` `[m, 2]` (the row's negatives,
/// and those of them below zero). Rows whose target is [`NONE`] are skipped.
pub fn row_stats(rows: &[f64], counts: &[u32], targets: &[u32], item: &[bool], has_candidates: bool, p: &IlrecParams, norm: f64) -> LossStats {
    let mut st = LossStats::default();
    for (r, &t) in targets.iter().enumerate() {
        if t == NONE {
            continue;
        }
        if item[r] && has_candidates {
            st.cpo += rows[r * 3];
            st.cpd += rows[r * 3 + 1];
            st.crr += rows[r * 3 + 2];
            st.item_rows += 1;
            st.negatives += counts[r * 2] as usize;
            st.negatives_below_zero += counts[r * 2 + 1] as usize;
        } else {
            st.ce += rows[r * 3];
        }
    }
    let scale = 1.0 / norm;
    st.cpo *= scale;
    st.cpd *= scale;
    st.crr *= scale;
    st.ce *= scale;
    st.loss = st.cpo + p.lambda as f64 * st.cpd + p.mu as f64 * st.crr + st.ce;
    st
}

/// `(splits, vocabulary tiles per split)` of pass 1 for `m` rows and `v` columns.
fn splits(m: usize, v: usize) -> (usize, usize) {
    let vt = v.div_ceil(TILE).max(1);
    let want = TARGET_BLOCKS.div_ceil(m.div_ceil(TILE).max(1)).clamp(1, vt.min(MAX_GRID_YZ));
    let tps = vt.div_ceil(want);
    (vt.div_ceil(tps), tps)
}

/// `(columns, padded row pitch)` of the backward's bf16 gradient chunk for `m` rows.
fn chunk(m: usize, v: usize) -> (usize, usize) {
    let vc = (CHUNK_BYTES / (2 * m.max(1))).max(TILE) / TILE * TILE;
    let vc = vc.min(v).max(1);
    (vc, vc.next_multiple_of(8))
}

#[cfg(test)]
mod tests {
    use super::{chunk, splits, CHUNK_BYTES, TILE};

    #[test]
    fn splits_cover_the_vocabulary_and_chunks_fit_the_budget() {
        for (m, v) in [(1usize, 1usize), (5, 301), (64, 49_152), (700, 151_936), (100_000, 257)] {
            let (s, tps) = splits(m, v);
            assert!(s * tps * TILE >= v && (s - 1) * tps * TILE < v, "{m} {v}");
            let (vc, ld) = chunk(m, v);
            assert!(vc >= 1 && vc <= v && ld % 8 == 0 && ld >= vc);
            assert!(2 * m * ld <= CHUNK_BYTES.max(2 * m * (TILE + 8)), "{m} {v}");
        }
    }
}
