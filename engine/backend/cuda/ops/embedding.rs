//! Launchers for kernels/embedding.cu: the token-embedding gather of the forward pass and the
//! deterministic scatter-add of the gradient into the rows of the trainable tokens (CPU reference:
//! engine/train/backprop.rs).
//!
//! Device-side index data is not validated here: reading token ids, slots or positions back to
//! the host would cost a synchronising copy per launch. The caller guarantees it, as the model
//! already does on the host before uploading (backprop.rs rejects token ids outside the
//! vocabulary; [`csr_positions`] builds valid lists). The kernels only ever WRITE in bounds (the
//! output element is fixed by the thread's block and column); a bad index makes them READ outside
//! a table, which yields a garbage row or an illegal-address fault that the next sync reports.
use super::{bad, expect_elem, expect_len, launch, u32_of, Ops};
use crate::backend::cuda::{Arg, Cuda, DeviceTensor, Elem, Launch, MAX_GRID_YZ};
use crate::error::{Error, Result};

const STEM: &str = "embedding";

/// The value of `slot[token]` for a token whose row is not trained.
pub const NOT_TRAINABLE: u32 = u32::MAX;

/// Threads per block of the scatter kernels; grid.y tiles the hidden size by this.
const SCATTER_BLOCK: usize = 256;




/// `(rows, h)` of a table-like operand: h is the last dimension, rows the product of the others
/// (a `[batch, seq, h]` activation is a table of batch * seq rows). The row width has to come
/// from the shape here, since the other operands (token ids) do not carry it.
fn dims2(kernel: &str, name: &str, t: &DeviceTensor, all: &[(&str, &DeviceTensor)]) -> Result<(usize, usize)> {
    match t.shape() {
        [lead @ .., h] if !lead.is_empty() => Ok((lead.iter().product(), *h)),
        _ => Err(bad(kernel, all, format!("`{name}` needs at least 2 dimensions, [rows, h]"))),
    }
}

/// `out[i, :] = table[tokens[i], :]`: table `[vocab, h]` f32 or bf16, tokens `[n]` u32, out
/// `[n, h]` of the table's type, or f32 from a bf16 table (exact widening).
///
/// Every token id must be < vocab. The launcher cannot check that without copying the ids back
/// (see the module comment); the caller validates them on the host before uploading, as the model
/// does.
pub fn gather(cuda: &Cuda, out: &mut DeviceTensor, table: &DeviceTensor, tokens: &DeviceTensor) -> Result<()> {
    let all: Ops = vec![("out", &*out), ("table", table), ("tokens", tokens)];
    let kernel = match (table.elem(), out.elem()) {
        (Elem::F32, Elem::F32) => "embedding_gather_f32",
        (Elem::BF16, Elem::BF16) => "embedding_gather_bf16",
        (Elem::BF16, Elem::F32) => "embedding_gather_bf16_to_f32",
        (t, o) => return Err(bad("embedding_gather", &all, format!("no gather from a {t:?} table into {o:?}"))),
    };
    expect_elem(kernel, "tokens", tokens, &[Elem::U32], &all)?;
    let (vocab, h) = dims2(kernel, "table", table, &all)?;
    let n = tokens.numel();
    let nh = n.checked_mul(h).ok_or_else(|| bad(kernel, &all, "n * h overflows"))?;
    expect_len(kernel, "out", out, nh, &all)?;
    if n == 0 || h == 0 {
        return Ok(());
    }
    if vocab == 0 {
        return Err(bad(kernel, &all, "the table has no rows to gather"));
    }
    let args = [Arg::Ptr(out.ptr()), Arg::Ptr(table.ptr()), Arg::Ptr(tokens.ptr()), Arg::U32(u32_of(kernel, "n", n, &all)?), Arg::U32(u32_of(kernel, "h", h, &all)?)];
    // SAFETY: out holds n * h elements and tokens n u32 of the types the entry point names; table
    // rows are read at the token ids, which the caller guarantees are < vocab (documented above).
    unsafe { launch(cuda, STEM, kernel, Launch::elements(nh), &args, &all) }
}

/// The scatter kernels' grid: one block row per slot, grid.y tiles of 256 columns.
fn scatter_cfg(kernel: &str, n_slots: usize, h: usize, all: &[(&str, &DeviceTensor)]) -> Result<Launch> {
    let tiles = h.div_ceil(SCATTER_BLOCK);
    if tiles > MAX_GRID_YZ {
        return Err(bad(kernel, all, format!("h = {h} needs {tiles} column tiles, more than grid.y allows ({MAX_GRID_YZ})")));
    }
    if n_slots > i32::MAX as usize {
        return Err(bad(kernel, all, format!("{n_slots} slots exceed grid.x")));
    }
    Ok(Launch { grid: (n_slots as u32, tiles as u32, 1), block: (SCATTER_BLOCK as u32, 1, 1), shared_bytes: 0 })
}

/// Checks grad `[n_slots, h]` f32 and dx `[n, h]` f32; returns (n_slots, h, n).
fn scatter_dims(kernel: &str, grad: &DeviceTensor, dx: &DeviceTensor, all: &[(&str, &DeviceTensor)]) -> Result<(usize, usize, usize)> {
    expect_elem(kernel, "grad", grad, &[Elem::F32], all)?;
    expect_elem(kernel, "dx", dx, &[Elem::F32], all)?;
    let (n_slots, h) = dims2(kernel, "grad", grad, all)?;
    if h == 0 {
        return if dx.numel() == 0 { Ok((n_slots, 0, 0)) } else { Err(bad(kernel, all, "`grad` has width 0 but `dx` has elements")) };
    }
    if !dx.numel().is_multiple_of(h) {
        return Err(bad(kernel, all, format!("`dx` holds {} elements, not a multiple of h = {h}", dx.numel())));
    }
    Ok((n_slots, h, dx.numel() / h))
}

/// `grad[s, :] += dx[i, :]` for each position i listed for slot s, in list order: grad
/// `[n_slots, h]` f32 (accumulated into), dx `[n, h]` f32, offsets `[n_slots + 1]` u32 and
/// positions u32 as [`csr_positions`] builds them (the caller's guarantee: offsets nondecreasing,
/// `offsets[n_slots] == positions.numel()`, every position < n). Bitwise equal to the CPU loop.
pub fn scatter_add_csr(cuda: &Cuda, grad: &mut DeviceTensor, dx: &DeviceTensor, offsets: &DeviceTensor, positions: &DeviceTensor) -> Result<()> {
    let kernel = "embedding_scatter_add_csr_f32";
    let all: Ops = vec![("grad", &*grad), ("dx", dx), ("offsets", offsets), ("positions", positions)];
    let (n_slots, h, n) = scatter_dims(kernel, grad, dx, &all)?;
    expect_elem(kernel, "offsets", offsets, &[Elem::U32], &all)?;
    expect_elem(kernel, "positions", positions, &[Elem::U32], &all)?;
    expect_len(kernel, "offsets", offsets, n_slots + 1, &all)?;
    // Each position belongs to at most one slot.
    if positions.numel() > n {
        return Err(bad(kernel, &all, format!("{} positions for {n} rows of dx", positions.numel())));
    }
    // No positions: nothing to add (valid offsets are then all 0).
    if n_slots == 0 || h == 0 || positions.numel() == 0 {
        return Ok(());
    }
    let cfg = scatter_cfg(kernel, n_slots, h, &all)?;
    let args = [Arg::Ptr(grad.ptr()), Arg::Ptr(dx.ptr()), Arg::Ptr(offsets.ptr()), Arg::Ptr(positions.ptr()), Arg::U32(u32_of(kernel, "h", h, &all)?)];
    // SAFETY: grad holds n_slots * h f32 and the grid covers (n_slots, >= h columns), writing only
    // grad[s, col < h]; offsets holds n_slots + 1 u32; the list contents are the caller's
    // guarantee (documented above).
    unsafe { launch(cuda, STEM, kernel, cfg, &args, &all) }
}

/// The CPU loop verbatim, without preprocessing: `grad[slot[tokens[i]], :] += dx[i, :]` for each
/// i in ascending order with `mask[i] != 0` and a trainable slot. grad `[n_slots, h]` f32, dx
/// `[n, h]` f32, tokens `[n]` u32 (each < vocab: the caller's guarantee), mask `[n]` u8, slot
/// `[vocab]` u32 ([`NOT_TRAINABLE`] for frozen rows). Reads n_slots * n indices: for small
/// batches, and as the check of [`scatter_add_csr`].
pub fn scatter_add_scan(cuda: &Cuda, grad: &mut DeviceTensor, dx: &DeviceTensor, tokens: &DeviceTensor, mask: &DeviceTensor, slot: &DeviceTensor) -> Result<()> {
    let kernel = "embedding_scatter_add_scan_f32";
    let all: Ops = vec![("grad", &*grad), ("dx", dx), ("tokens", tokens), ("mask", mask), ("slot", slot)];
    let (n_slots, h, _) = scatter_dims(kernel, grad, dx, &all)?;
    expect_elem(kernel, "tokens", tokens, &[Elem::U32], &all)?;
    expect_elem(kernel, "mask", mask, &[Elem::U8], &all)?;
    expect_elem(kernel, "slot", slot, &[Elem::U32], &all)?;
    let n = tokens.numel();
    let nh = n.checked_mul(h).ok_or_else(|| bad(kernel, &all, "n * h overflows"))?;
    expect_len(kernel, "dx", dx, nh, &all)?;
    expect_len(kernel, "mask", mask, n, &all)?;
    if n_slots == 0 || h == 0 || n == 0 {
        return Ok(());
    }
    if slot.numel() == 0 {
        return Err(bad(kernel, &all, "`slot` is empty: no token id can index it"));
    }
    let cfg = scatter_cfg(kernel, n_slots, h, &all)?;
    let args = [
        Arg::Ptr(grad.ptr()),
        Arg::Ptr(dx.ptr()),
        Arg::Ptr(tokens.ptr()),
        Arg::Ptr(mask.ptr()),
        Arg::Ptr(slot.ptr()),
        Arg::U32(u32_of(kernel, "n", n, &all)?),
        Arg::U32(u32_of(kernel, "h", h, &all)?),
    ];
    // SAFETY: grad holds n_slots * h f32 (the only writes, at grad[s, col < h]); dx n * h f32;
    // tokens n u32, mask n u8; slot is indexed by token ids the caller guarantees are < vocab.
    unsafe { launch(cuda, STEM, kernel, cfg, &args, &all) }
}

/// Host side of [`scatter_add_csr`]: `(offsets, positions)` where `positions[offsets[s] ..
/// offsets[s + 1]]` are the positions i, ascending, with `mask[i]` set and `slot[tokens[i]] == s`
/// (`offsets` has `n_slots + 1` entries, `offsets[n_slots] == positions.len()`).
///
/// Fails (`Error::Input`) on a token id outside `slot`, a slot value that is neither
/// [`NOT_TRAINABLE`] nor below `n_slots`, a mask of another length, or more than `u32::MAX`
/// positions: any of them would make the kernel read outside its operands.
pub fn csr_positions(tokens: &[u32], mask: &[bool], slot: &[u32], n_slots: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    if mask.len() != tokens.len() {
        return Err(Error::Input(format!("csr_positions: {} tokens but {} mask flags", tokens.len(), mask.len())));
    }
    if u32::try_from(tokens.len()).is_err() {
        return Err(Error::Input(format!("csr_positions: {} positions exceed u32", tokens.len())));
    }
    // The slot of each position (None: not scattered), validated once.
    let mut of = Vec::with_capacity(tokens.len());
    let mut counts = vec![0u32; n_slots];
    for (i, (&tok, &m)) in tokens.iter().zip(mask).enumerate() {
        let s = *slot
            .get(tok as usize)
            .ok_or_else(|| Error::Input(format!("csr_positions: token {tok} at position {i} is outside the {}-entry slot table", slot.len())))?;
        if !m || s == NOT_TRAINABLE {
            of.push(None);
            continue;
        }
        let si = s as usize;
        if si >= n_slots {
            return Err(Error::Input(format!("csr_positions: token {tok} maps to slot {s}, but there are {n_slots} slots")));
        }
        counts[si] += 1;
        of.push(Some(si));
    }
    let mut offsets = Vec::with_capacity(n_slots + 1);
    let mut total = 0u32;
    offsets.push(0);
    for &c in &counts {
        total += c;
        offsets.push(total);
    }
    // A stable counting sort: walking positions in ascending order keeps each slot's list
    // ascending, the order the CPU loop adds them in.
    let mut next: Vec<u32> = offsets[..n_slots].to_vec();
    let mut positions = vec![0u32; total as usize];
    for (i, s) in of.into_iter().enumerate() {
        if let Some(s) = s {
            positions[next[s] as usize] = i as u32;
            next[s] += 1;
        }
    }
    Ok((offsets, positions))
}

#[cfg(test)]
mod tests {
    use super::{csr_positions, NOT_TRAINABLE as X};

    #[test]
    fn csr_lists_each_slots_masked_positions_in_ascending_order() {
        // vocab 6; tokens 1 and 4 are trainable (slots 1 and 0), slot 2 never occurs.
        let slot = [X, 1, X, X, 0, 2];
        let tokens = [4, 1, 1, 0, 4, 4, 1, 3];
        let mask = [true, true, false, true, true, false, true, true];
        let (offsets, positions) = csr_positions(&tokens, &mask, &slot, 3).unwrap();
        assert_eq!(offsets, vec![0, 2, 4, 4]);
        assert_eq!(positions, vec![0, 4, 1, 6]);
    }

    #[test]
    fn csr_rejects_what_would_read_out_of_bounds() {
        let slot = [X, 0, 5];
        assert!(csr_positions(&[3], &[true], &slot, 1).is_err(), "token outside the slot table");
        assert!(csr_positions(&[2], &[true], &slot, 1).is_err(), "slot value past n_slots");
        assert!(csr_positions(&[1, 1], &[true], &slot, 1).is_err(), "mask length");
        // A bad slot value behind a cleared mask is never used.
        assert_eq!(csr_positions(&[2, 1], &[false, true], &slot, 1).unwrap(), (vec![0, 1], vec![1]));
        assert_eq!(csr_positions(&[], &[], &slot, 2).unwrap(), (vec![0, 0, 0], vec![]));
    }
}
