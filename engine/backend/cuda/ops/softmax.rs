//! Launchers for kernels/softmax_ce.cu: the per-row cross-entropy (loss and logit gradient), its
//! normalised total, log-softmax and its backward.
//! CPU reference: engine/train/loss.rs (`logsumexp`, `ce_row`, `sft_loss`).
//!
//! Targets travel as [`Targets`], built only from a host slice that was checked against the
//! vocabulary: the kernel indexes the logits row with the target unchecked, so an id past the
//! vocabulary would read outside the logits (a fault that kills the context), and reading device
//! ids back to check them would cost a sync per call. Host batches are where the ids come from
//! anyway, and one `Targets` serves the forward and backward of a step.
use super::{bad, describe, expect_elem, expect_len, u32_of};
use crate::backend::cuda::{Arg, Cuda, DeviceTensor, Elem, Launch};
use crate::error::{Error, Result};

const STEM: &str = "softmax_ce";

/// Threads per row (one block per row; any multiple of 32 up to 1024 is correct).
const ROW_BLOCK: u32 = 256;

/// `gridDim.x` limit: at most this many rows per launch.
const MAX_ROWS: usize = i32::MAX as usize;

/// The target of a row that contributes no loss and a zero gradient row.
pub const IGNORE: u32 = u32::MAX;

/// Cross-entropy targets on the device, each `< vocab` or [`IGNORE`] (checked on construction).
#[derive(Debug)]
pub struct Targets {
    ids: DeviceTensor,
    vocab: usize,
}

impl Targets {
    /// Checks every id against `vocab` (as `sft_loss` does, with [`IGNORE`] allowed) and uploads
    /// them. An id out of range is `Error::Input` naming the row.
    pub fn new(cuda: &Cuda, targets: &[u32], vocab: usize) -> Result<Self> {
        if vocab == 0 || vocab > u32::MAX as usize {
            return Err(Error::Input(format!("cross-entropy targets: vocabulary of {vocab} ids is not supported")));
        }
        if let Some(i) = targets.iter().position(|&t| t != IGNORE && t as usize >= vocab) {
            return Err(Error::Input(format!("loss: target {} of row {i} is outside the vocabulary ({vocab})", targets[i])));
        }
        let ids = DeviceTensor::from_u32(cuda, &[targets.len()], targets, "cross-entropy targets")?;
        Ok(Targets { ids, vocab })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.numel()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The vocabulary the ids were checked against.
    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// The u32 `[n]` device tensor.
    pub fn tensor(&self) -> &DeviceTensor {
        &self.ids
    }
}

/// `(rows, vocab)` of a row-major tensor whose last dimension is the vocabulary (leading
/// dimensions are rows); the vocabulary must be non-empty and the rows fit one grid.
fn rows_vocab(kernel: &str, name: &str, t: &DeviceTensor, all: &[(&str, &DeviceTensor)]) -> Result<(usize, usize)> {
    let Some(&vocab) = t.shape().last() else {
        return Err(bad(kernel, all, format!("`{name}` must have a vocabulary dimension")));
    };
    if vocab == 0 {
        return Err(bad(kernel, all, format!("`{name}` has an empty vocabulary")));
    }
    u32_of(kernel, "vocab", vocab, all)?;
    let rows = t.numel() / vocab;
    if rows > MAX_ROWS {
        return Err(bad(kernel, all, format!("{rows} rows exceed the grid limit of {MAX_ROWS}")));
    }
    Ok((rows, vocab))
}

fn same_shape(kernel: &str, name: &str, t: &DeviceTensor, like: &DeviceTensor, all: &[(&str, &DeviceTensor)]) -> Result<()> {
    if t.shape() != like.shape() {
        return Err(bad(kernel, all, format!("`{name}` must have shape {:?}", like.shape())));
    }
    Ok(())
}

/// Cross-entropy per row (`ce_row` of loss.rs): `loss[r] = lse_r - z[r, y_r]` (f64 `[n]`) and,
/// when `dlogits` is given (f32, the logits' shape), `(softmax - onehot) * scale` with the CPU's
/// two f32 roundings. `logits` is f32 or bf16 `[.., vocab]` (`n` rows in all); `scale` is
/// `1 / norm` for the SFT loss. Rows whose target is [`IGNORE`] get loss 0 and a zero gradient.
///
/// The logits must be finite (the kernel does not check; `sft_loss` rejects non-finite logits,
/// so a caller that needs that error checks them first, e.g. with `optim::count_nonfinite`).
pub fn softmax_ce(cuda: &Cuda, loss: &mut DeviceTensor, dlogits: Option<&mut DeviceTensor>, logits: &DeviceTensor, targets: &Targets, scale: f64) -> Result<()> {
    let kernel = match logits.elem() {
        Elem::BF16 => "softmax_ce_bf16",
        _ => "softmax_ce_f32",
    };
    let mut all = vec![("loss", &*loss), ("logits", logits), ("targets", targets.tensor())];
    if let Some(d) = &dlogits {
        all.push(("dlogits", &**d));
    }
    expect_elem(kernel, "logits", logits, &[Elem::F32, Elem::BF16], &all)?;
    let (n, vocab) = rows_vocab(kernel, "logits", logits, &all)?;
    if targets.vocab() != vocab || targets.len() != n {
        return Err(bad(
            kernel,
            &all,
            format!("targets are {} rows checked against a vocabulary of {}; the logits have {n} rows of {vocab}", targets.len(), targets.vocab()),
        ));
    }
    expect_elem(kernel, "loss", loss, &[Elem::F64], &all)?;
    expect_len(kernel, "loss", loss, n, &all)?;
    if let Some(d) = &dlogits {
        expect_elem(kernel, "dlogits", d, &[Elem::F32], &all)?;
        same_shape(kernel, "dlogits", d, logits, &all)?;
    }
    if !scale.is_finite() {
        return Err(bad(kernel, &all, format!("gradient scale {scale} is not finite")));
    }
    if n == 0 {
        return Ok(());
    }
    let args = [
        Arg::Ptr(loss.ptr()),
        Arg::Ptr(dlogits.as_ref().map_or(0, |d| d.ptr())),
        Arg::Ptr(logits.ptr()),
        Arg::Ptr(targets.tensor().ptr()),
        Arg::U32(vocab as u32),
        Arg::F64(scale),
    ];
    // SAFETY: (double*, float* or null, const T*, const uint32_t*, uint32_t, double) as
    // softmax_ce_{f32,bf16} take them, T matching the logits' element type; one block per row
    // over n rows: logits and dlogits hold n * vocab elements, loss and targets n; every target
    // is < vocab or IGNORE (checked by `Targets::new`, and its vocabulary equals this one), so
    // z[y] stays inside its row.
    unsafe { cuda.launch(STEM, kernel, Launch::rows(n, ROW_BLOCK), &args, &|| describe(&all)) }
}

/// `out = (sum of the per-row losses, in row order) / norm` into `out` (f64, one element), from
/// the f64 `loss` of [`softmax_ce`]: `sft_loss`'s `ce`, its sum associated sequentially. `norm`
/// must be positive and finite, as `sft_loss` requires.
pub fn ce_loss_total(cuda: &Cuda, out: &mut DeviceTensor, loss: &DeviceTensor, norm: f64) -> Result<()> {
    const K: &str = "ce_loss_total";
    let all = [("out", &*out), ("loss", loss)];
    expect_elem(K, "out", out, &[Elem::F64], &all)?;
    expect_len(K, "out", out, 1, &all)?;
    expect_elem(K, "loss", loss, &[Elem::F64], &all)?;
    let n = u32_of(K, "rows", loss.numel(), &all)?;
    if !(norm > 0.0 && norm.is_finite()) {
        return Err(bad(K, &all, format!("normaliser must be positive, got {norm}")));
    }
    let cfg = Launch { grid: (1, 1, 1), block: (1, 1, 1), shared_bytes: 0 };
    let args = [Arg::Ptr(out.ptr()), Arg::Ptr(loss.ptr()), Arg::U32(n), Arg::F64(norm)];
    // SAFETY: (double*, const double*, uint32_t, double) as ce_loss_total takes them; out is one
    // f64, loss holds n f64 (none read when n is 0).
    unsafe { cuda.launch(STEM, K, cfg, &args, &|| describe(&all)) }
}

/// `out[r, j] = z[r, j] - lse_r` (lse in f64, rounded to f32 once): `logits` f32 or bf16
/// `[.., vocab]`, `out` f32 of the same shape.
pub fn log_softmax(cuda: &Cuda, out: &mut DeviceTensor, logits: &DeviceTensor) -> Result<()> {
    let kernel = match logits.elem() {
        Elem::BF16 => "log_softmax_bf16",
        _ => "log_softmax_f32",
    };
    let all = [("out", &*out), ("logits", logits)];
    expect_elem(kernel, "logits", logits, &[Elem::F32, Elem::BF16], &all)?;
    expect_elem(kernel, "out", out, &[Elem::F32], &all)?;
    same_shape(kernel, "out", out, logits, &all)?;
    let (n, vocab) = rows_vocab(kernel, "logits", logits, &all)?;
    if n == 0 {
        return Ok(());
    }
    let args = [Arg::Ptr(out.ptr()), Arg::Ptr(logits.ptr()), Arg::U32(vocab as u32)];
    // SAFETY: (float*, const T*, uint32_t) as log_softmax_{f32,bf16} take them, T matching the
    // logits; one block per row over n rows of vocab elements in both tensors; `out` is borrowed
    // mutably, so it does not alias `logits` (the kernel requires that).
    unsafe { cuda.launch(STEM, kernel, Launch::rows(n, ROW_BLOCK), &args, &|| describe(&all)) }
}

/// Log-softmax backward: `dz = dy - exp(out) * rowsum(dy)` (PyTorch's
/// `_log_softmax_backward_data`), from the forward's f32 output `out`; all f32, one shape.
pub fn log_softmax_backward(cuda: &Cuda, dz: &mut DeviceTensor, dy: &DeviceTensor, out: &DeviceTensor) -> Result<()> {
    let all = [("dz", &*dz), ("dy", dy), ("out", out)];
    lsm_backward(cuda, dz.ptr(), dy, out, &all)
}

/// [`log_softmax_backward`] writing the result over `dy` (the kernel allows `dz == dy`).
pub fn log_softmax_backward_inplace(cuda: &Cuda, dy: &mut DeviceTensor, out: &DeviceTensor) -> Result<()> {
    let all = [("dy", &*dy), ("out", out)];
    lsm_backward(cuda, dy.ptr(), dy, out, &all)
}

fn lsm_backward(cuda: &Cuda, dz_ptr: u64, dy: &DeviceTensor, out: &DeviceTensor, all: &[(&str, &DeviceTensor)]) -> Result<()> {
    const K: &str = "log_softmax_backward_f32";
    for (name, t) in all {
        expect_elem(K, name, t, &[Elem::F32], all)?;
        same_shape(K, name, t, out, all)?;
    }
    let (n, vocab) = rows_vocab(K, "out", out, all)?;
    if n == 0 {
        return Ok(());
    }
    let args = [Arg::Ptr(dz_ptr), Arg::Ptr(dy.ptr()), Arg::Ptr(out.ptr()), Arg::U32(vocab as u32)];
    // SAFETY: (float*, const float*, const float*, uint32_t) as log_softmax_backward_f32 takes
    // them; dz (the first operand of `all`, or dy itself, which the kernel allows: each thread
    // reads dy[j] before writing dz[j], and the row sum is complete before any write), dy and
    // out are f32 of one shape, n rows of vocab; one block per row.
    unsafe { cuda.launch(STEM, K, Launch::rows(n, ROW_BLOCK), &args, &|| describe(all)) }
}
