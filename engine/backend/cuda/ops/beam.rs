//! Launchers for kernels/beam.cu: the trie-constrained beam step (`beam_lse_f32` + `beam_select`)
//! over a [`DeviceTrie`] and a [`DeviceBeamState`], and the KV-cache reorder (`kv_reorder_f32`).
//! Host reference: `flat_step` in engine/rec/beam.rs (docs/kernels/decode.md).
//!
//! The kernels index the trie and the logits with node and token ids they read from device
//! memory, so everything they index with is validated on the host when it is uploaded (the trie
//! by `FlatTrie::validate`, a state by [`DeviceBeamState::upload`]); afterwards only the kernels
//! write those arrays, and they write only children read from the trie.
//!
//! Status: compiled, unverified on GPU.
use super::{bad, describe, expect_elem, expect_len, u32_of};
use crate::backend::cuda::{Arg, Cuda, DeviceTensor, Elem, Launch};
use crate::error::{Error, Result};
use crate::rec::beam::FlatBeamState;
use crate::rec::trie::{FlatTrie, NO_NODE};

const STEM: &str = "beam";
/// Threads of `beam_select` (its SELECT_THREADS).
const SELECT_THREADS: u32 = 512;
/// The widest beam the step supports (its MAX_BEAM; the key holds the beam index in 9 bits).
pub const MAX_BEAM: usize = 512;
/// Tokens must fit the key's 23 bits next to the beam index.
const MAX_VOCAB: usize = 1 << 23;
/// Node ids must leave the leaf flag bit free.
const MAX_NODES: usize = 1 << 31;
/// The err cell's value when every logits row was finite.
const NO_ERROR: u32 = u32::MAX;

/// A validated [`FlatTrie`] on the device. Built once per item set.
pub struct DeviceTrie {
    child_start: DeviceTensor,
    child_token: DeviceTensor,
    child_node: DeviceTensor,
    node_item: DeviceTensor,
    pub vocab: usize,
    pub max_fanout: usize,
    pub max_len: usize,
    pub nodes: usize,
    /// Candidates one user can have in a step: the root's fan-out (the root is only ever live
    /// alone, in slot 0) or `beam` times the largest fan-out below it, per beam width.
    root_fanout: usize,
    inner_fanout: usize,
}

impl DeviceTrie {
    fn max_candidates(&self, beam: usize) -> usize {
        self.root_fanout.max(beam * self.inner_fanout).max(1)
    }
}

impl DeviceTrie {
    /// Validates `trie` (the kernels rely on its invariants unchecked) and uploads it.
    pub fn new(cuda: &Cuda, trie: &FlatTrie) -> Result<Self> {
        trie.validate()?;
        let nodes = trie.num_nodes();
        if nodes >= MAX_NODES || trie.vocab > MAX_VOCAB {
            return Err(Error::Input(format!(
                "device beam search: {nodes} trie nodes (limit {MAX_NODES}) or a vocabulary of {} (limit {MAX_VOCAB}) is too large",
                trie.vocab
            )));
        }
        let edges = trie.child_token.len();
        let fan = |n: usize| (trie.child_start[n + 1] - trie.child_start[n]) as usize;
        let inner_fanout = (1..nodes).map(fan).max().unwrap_or(0);
        Ok(DeviceTrie {
            root_fanout: fan(0),
            inner_fanout,
            child_start: DeviceTensor::from_u32(cuda, &[nodes + 1], &trie.child_start, "trie child offsets")?,
            child_token: DeviceTensor::from_u32(cuda, &[edges], &trie.child_token, "trie child tokens")?,
            child_node: DeviceTensor::from_u32(cuda, &[edges], &trie.child_node, "trie child nodes")?,
            node_item: DeviceTensor::from_u32(cuda, &[nodes], &trie.node_item, "trie node items")?,
            vocab: trie.vocab,
            max_fanout: trie.max_fanout,
            max_len: trie.max_len,
            nodes,
        })
    }
}

/// [`FlatBeamState`] on the device, with the per-step outputs (parent slot and token of every new
/// slot) and the kernels' scratch.
pub struct DeviceBeamState {
    pub users: usize,
    pub beam: usize,
    pub top_k: usize,
    max_cand: usize,
    node: DeviceTensor,
    score: DeviceTensor,
    done: DeviceTensor,
    fin_score: DeviceTensor,
    fin_item: DeviceTensor,
    fin_count: DeviceTensor,
    parent: DeviceTensor,
    token: DeviceTensor,
    lse: DeviceTensor,
    err: DeviceTensor,
    cand_key: DeviceTensor,
    cand_child: DeviceTensor,
}

impl DeviceBeamState {
    /// Uploads `st` for `trie`, after checking every value a kernel indexes with.
    pub fn upload(cuda: &Cuda, trie: &DeviceTrie, st: &FlatBeamState) -> Result<Self> {
        let (users, beam, top_k) = (st.users, st.beam, st.top_k);
        let slots = users * beam;
        let fits = st.node.len() == slots
            && st.score.len() == slots
            && st.done.len() == users
            && st.fin_score.len() == users * top_k
            && st.fin_item.len() == users * top_k
            && st.fin_count.len() == users;
        if !fits || beam == 0 || beam > MAX_BEAM || top_k == 0 || top_k > beam || users == 0 {
            return Err(Error::Input(format!(
                "device beam state: {users} users x beam {beam} (1..={MAX_BEAM}), top_k {top_k} (1..=beam), arrays of the wrong length or empty"
            )));
        }
        if let Some(n) = st.node.iter().find(|&&n| n != NO_NODE && n as usize >= trie.nodes) {
            return Err(Error::Input(format!("device beam state: node {n} is not one of the trie's {} nodes", trie.nodes)));
        }
        if let Some(c) = st.fin_count.iter().find(|&&c| c as usize > top_k) {
            return Err(Error::Input(format!("device beam state: {c} finished items exceed top_k {top_k}")));
        }
        if let Some(s) = st.node.iter().position(|&n| n == 0).filter(|s| s % beam != 0) {
            return Err(Error::Input(format!("device beam state: the root is live in slot {} of user {} (only slot 0 may hold it)", s % beam, s / beam)));
        }
        let max_cand = trie.max_candidates(beam);
        let all: [(&str, &DeviceTensor); 0] = [];
        u32_of("beam_select", "max_cand", max_cand, &all)?;
        let done: Vec<u32> = st.done.iter().map(|&d| d as u32).collect();
        Ok(DeviceBeamState {
            users,
            beam,
            top_k,
            max_cand,
            node: DeviceTensor::from_u32(cuda, &[slots], &st.node, "beam nodes")?,
            score: DeviceTensor::from_f64(cuda, &[slots], &st.score, "beam scores")?,
            done: DeviceTensor::from_u32(cuda, &[users], &done, "beam done flags")?,
            fin_score: DeviceTensor::from_f64(cuda, &[users * top_k], &st.fin_score, "finished scores")?,
            fin_item: DeviceTensor::from_u32(cuda, &[users * top_k], &st.fin_item, "finished items")?,
            fin_count: DeviceTensor::from_u32(cuda, &[users], &st.fin_count, "finished counts")?,
            parent: DeviceTensor::zeros(cuda, &[slots], Elem::U32, "beam parents")?,
            token: DeviceTensor::zeros(cuda, &[slots], Elem::U32, "beam tokens")?,
            lse: DeviceTensor::zeros(cuda, &[slots], Elem::F64, "beam log-sum-exp")?,
            err: DeviceTensor::from_u32(cuda, &[1], &[NO_ERROR], "beam non-finite row")?,
            // u64 keys, stored as 8-byte elements.
            cand_key: DeviceTensor::empty(cuda, &[users * max_cand], Elem::F64, "beam candidate keys")?,
            cand_child: DeviceTensor::empty(cuda, &[users * max_cand], Elem::U32, "beam candidate children")?,
        })
    }

    /// Copies the state back (waits for queued work).
    pub fn download(&self) -> Result<FlatBeamState> {
        Ok(FlatBeamState {
            users: self.users,
            beam: self.beam,
            top_k: self.top_k,
            node: self.node.to_u32_vec()?,
            score: self.score.to_f64_vec()?,
            done: self.done.to_u32_vec()?.into_iter().map(|d| d != 0).collect(),
            fin_score: self.fin_score.to_f64_vec()?,
            fin_item: self.fin_item.to_u32_vec()?,
            fin_count: self.fin_count.to_u32_vec()?,
        })
    }

    /// `[users * beam]` user-local parent slot of each new slot (after a step).
    pub fn parent(&self) -> &DeviceTensor {
        &self.parent
    }

    /// `[users * beam]` token appended by each new slot (after a step).
    pub fn token(&self) -> &DeviceTensor {
        &self.token
    }

    /// The first logits row (of any step so far) with a NaN or +inf, if any (waits for queued
    /// work).
    pub fn non_finite_row(&self) -> Result<Option<u32>> {
        let e = self.err.to_u32_vec()?[0];
        Ok((e != NO_ERROR).then_some(e))
    }
}

/// One beam step: `logits` `[users * rows_per_user, vocab]` f32 (slot `b` of user `u` reads row
/// `u * rows_per_user + b`; 1 row per user after the prompt, `beam` afterwards). Updates the state
/// and writes its parents and tokens.
pub fn beam_step(cuda: &Cuda, trie: &DeviceTrie, st: &mut DeviceBeamState, logits: &DeviceTensor, rows_per_user: usize) -> Result<()> {
    let kernel = "beam_select";
    let all = [("logits", logits), ("node", &st.node), ("cand_key", &st.cand_key)];
    expect_elem(kernel, "logits", logits, &[Elem::F32], &all)?;
    if rows_per_user == 0 || rows_per_user > st.beam {
        return Err(bad(kernel, &all, format!("rows_per_user {rows_per_user} must be in 1..=beam ({})", st.beam)));
    }
    let rows = st.users * rows_per_user;
    expect_len(kernel, "logits", logits, rows * trie.vocab, &all)?;
    if rows > i32::MAX as usize {
        return Err(bad(kernel, &all, format!("{rows} logits rows exceed the grid limit")));
    }
    if st.max_cand < trie.max_candidates(st.beam) {
        return Err(bad(kernel, &all, "the state was uploaded for a trie with a smaller fan-out"));
    }
    let vocab = u32_of(kernel, "vocab", trie.vocab, &all)?;
    let rpu = rows_per_user as u32;
    let beam = st.beam as u32;
    let lse_args = [Arg::Ptr(st.lse.ptr()), Arg::Ptr(st.err.ptr()), Arg::Ptr(logits.ptr()), Arg::Ptr(st.node.ptr()), Arg::U32(vocab), Arg::U32(rpu), Arg::U32(beam)];
    let shape = || describe(&all);
    // SAFETY: logits hold users * rows_per_user rows of vocab f32; node and lse hold users * beam
    // slots and every row's slot u * beam + b (b < rows_per_user <= beam) is inside them.
    unsafe { cuda.launch(STEM, "beam_lse_f32", Launch::rows(rows, 256), &lse_args, &shape)? };
    let args = [
        Arg::Ptr(st.node.ptr()),
        Arg::Ptr(st.score.ptr()),
        Arg::Ptr(st.done.ptr()),
        Arg::Ptr(st.fin_score.ptr()),
        Arg::Ptr(st.fin_item.ptr()),
        Arg::Ptr(st.fin_count.ptr()),
        Arg::Ptr(st.parent.ptr()),
        Arg::Ptr(st.token.ptr()),
        Arg::Ptr(st.cand_key.ptr()),
        Arg::Ptr(st.cand_child.ptr()),
        Arg::Ptr(logits.ptr()),
        Arg::Ptr(st.lse.ptr()),
        Arg::Ptr(trie.child_start.ptr()),
        Arg::Ptr(trie.child_token.ptr()),
        Arg::Ptr(trie.child_node.ptr()),
        Arg::Ptr(trie.node_item.ptr()),
        Arg::U32(vocab),
        Arg::U32(rpu),
        Arg::U32(beam),
        Arg::U32(st.top_k as u32),
        Arg::U32(st.max_cand as u32),
    ];
    let cfg = Launch { grid: (st.users as u32, 1, 1), block: (SELECT_THREADS, 1, 1), shared_bytes: 0 };
    if st.users > i32::MAX as usize {
        return Err(bad(kernel, &all, format!("{} users exceed the grid limit", st.users)));
    }
    // SAFETY: the state's arrays hold users * beam slots, users * top_k finished entries and
    // users * max_cand candidates (the kernel clamps a user's candidates to max_cand, which
    // covers every user's candidates: the root only in slot 0, other nodes' fan-outs at most
    // inner_fanout); its nodes were checked against this trie on upload and the kernel
    // only writes trie children; trie tokens are < vocab (FlatTrie::validate), so every logits
    // index is inside the rows_per_user rows of the user.
    unsafe { cuda.launch(STEM, kernel, cfg, &args, &shape) }
}

/// Sizes of a KV reorder: `groups` users, `src_per` rows each in the old cache and `dst_per` in
/// the new one, positions `0 .. len` of `[rows, heads, cap, d]`.
#[derive(Clone, Copy, Debug)]
pub struct ReorderLayout {
    pub groups: usize,
    pub src_per: usize,
    pub dst_per: usize,
    pub heads: usize,
    pub cap: usize,
    pub len: usize,
    pub d: usize,
}

/// `dst` row `r` = `src` row `parent[r]` of the same group (kv_reorder_f32). Parents are clamped
/// into the group by the kernel, so their values need no check.
pub fn kv_reorder(cuda: &Cuda, dst: &mut DeviceTensor, src: &DeviceTensor, parent: &DeviceTensor, s: ReorderLayout) -> Result<()> {
    let kernel = "kv_reorder_f32";
    let all = [("dst", &*dst), ("src", src), ("parent", parent)];
    expect_elem(kernel, "dst", dst, &[Elem::F32], &all)?;
    expect_elem(kernel, "src", src, &[Elem::F32], &all)?;
    expect_elem(kernel, "parent", parent, &[Elem::U32], &all)?;
    let ReorderLayout { groups, src_per, dst_per, heads, cap, len, d } = s;
    let row = heads * cap * d;
    let fits = src.numel() == groups * src_per * row && dst.numel() == groups * dst_per * row && parent.numel() == groups * dst_per;
    if !fits || src_per == 0 || len > cap {
        return Err(bad(kernel, &all, format!("{s:?} does not fit")));
    }
    let n = groups * dst_per * heads * len * d;
    if n == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(dst.ptr()),
        Arg::Ptr(src.ptr()),
        Arg::Ptr(parent.ptr()),
        Arg::U32(u32_of(kernel, "groups", groups, &all)?),
        Arg::U32(u32_of(kernel, "src_per", src_per, &all)?),
        Arg::U32(u32_of(kernel, "dst_per", dst_per, &all)?),
        Arg::U32(u32_of(kernel, "heads", heads, &all)?),
        Arg::U32(u32_of(kernel, "cap", cap, &all)?),
        Arg::U32(u32_of(kernel, "len", len, &all)?),
        Arg::U32(u32_of(kernel, "d", d, &all)?),
    ];
    let shape = || format!("{s:?}: {}", describe(&all));
    // SAFETY: src and dst hold exactly their layouts' f32 elements, parent one u32 per dst row;
    // len <= cap and the clamped parent keep every source index inside src.
    unsafe { cuda.launch(STEM, kernel, Launch::elements(n), &args, &shape) }
}
