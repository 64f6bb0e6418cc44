//! Training checkpoints: atomic file writes, one directory per saved step, a `latest` pointer,
//! pruning to the last K, and loading with typed errors that name the file at fault
//! (docs/training.md).
//!
//! Layout of a checkpoint root `DIR`:
//! ```text
//! DIR/latest                      "step-N\n", replaced atomically after each save
//! DIR/step-N/trainable.safetensors   the trainer's f32 tensors (LoRA A/B, new-token rows, ...)
//! DIR/step-N/optimizer.safetensors   AdamW state (`Optimizer::state_tensors`)
//! DIR/step-N/state.json              counters, RNG, schedule, optimizer config, trainer config,
//!                                    tensor order, byte sizes and FNV-1a checksums of both files
//! ```
//! A step directory is built as `step-N.tmp-<pid>` and renamed into place only when complete,
//! so any directory named exactly `step-N` is a complete checkpoint.
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Map, Value};

use super::optim::{AdamW, NamedTensor, Schedule};
use crate::error::{Error, Result};

/// `state.json`'s `format` value.
pub const FORMAT: &str = "ilrec-train-checkpoint";
/// `state.json`'s `format_version` value written by this code (the only one it reads).
pub const FORMAT_VERSION: u64 = 1;
/// File names inside a step directory.
pub const TRAINABLE_FILE: &str = "trainable.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
/// The pointer file in the checkpoint root.
pub const LATEST_FILE: &str = "latest";

/// Everything needed to resume a run exactly.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Optimizer steps completed (the directory is `step-{step}`).
    pub step: u64,
    /// Micro-batches consumed in total (gradient accumulation counts each one).
    pub micro_step: u64,
    /// Epoch of the data order the next micro-batch comes from.
    pub epoch: u64,
    /// Position of the next example within that epoch's order.
    pub data_cursor: u64,
    /// `Rng::state()` of the trainer's generator (data order, dropout).
    pub rng: [u64; 4],
    pub schedule: Schedule,
    pub optimizer: AdamW,
    /// Free-form trainer configuration (model path, LoRA rank, ...), stored verbatim.
    pub config: Value,
    /// The trainable tensors, in the trainer's order.
    pub trainable: Vec<NamedTensor>,
    /// `Optimizer::state_tensors()`.
    pub optimizer_state: Vec<NamedTensor>,
}

/// Writes `bytes` to `path` so that `path` holds either its old content or all of `bytes`,
/// never a mix: a uniquely named temp file in the same directory is written and fsynced, renamed
/// over `path`, and the directory is fsynced so the rename is durable.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| Error::Input(format!("{} has no file name", path.display())))?;
    let dir = parent_dir(path);
    let (tmp, mut file) = loop {
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        match File::options().write(true).create_new(true).open(&tmp) {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(tmp, e)),
        }
    };
    let written = file
        .write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| Error::io(&tmp, e));
    drop(file);
    let renamed = written.and_then(|_| fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if let Err(e) = renamed {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(&dir)
}

/// Saves `ckpt` as `dir/step-{step}` (replacing an existing one for the same step), points
/// `dir/latest` at it, then keeps only the `keep_last` highest steps at or below this one
/// (`0` keeps all; directories of higher steps, left by an abandoned run, are not touched).
/// Returns the step directory. A pruning error is returned after the checkpoint is complete.
pub fn save_checkpoint(dir: &Path, ckpt: &Checkpoint, keep_last: usize) -> Result<PathBuf> {
    validate_tensors("trainable", &ckpt.trainable)?;
    validate_tensors("optimizer state", &ckpt.optimizer_state)?;
    ckpt.optimizer.validate()?;
    ckpt.schedule.validate()?;
    let trainable = serialize(&ckpt.trainable).map_err(|e| Error::Input(format!("trainable tensors: {e}")))?;
    let optimizer = serialize(&ckpt.optimizer_state).map_err(|e| Error::Input(format!("optimizer tensors: {e}")))?;
    let state = state_json(ckpt, &trainable, &optimizer);
    let state = serde_json::to_vec_pretty(&state).expect("serialising a serde_json::Value cannot fail");

    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = step_dir_name(ckpt.step);
    let pid = std::process::id();
    let final_dir = dir.join(&name);
    let tmp_dir = dir.join(format!("{name}.tmp-{pid}"));
    if tmp_dir.exists() {
        fs::remove_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
    }
    fs::create_dir(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
    write_synced(&tmp_dir.join(TRAINABLE_FILE), &trainable)?;
    write_synced(&tmp_dir.join(OPTIMIZER_FILE), &optimizer)?;
    write_synced(&tmp_dir.join(STATE_FILE), &state)?;
    sync_dir(&tmp_dir)?;

    // Directories cannot be renamed over non-empty ones: move an old copy of this step aside.
    let old = dir.join(format!("{name}.old-{pid}"));
    let replaced = final_dir.exists();
    if replaced {
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        fs::rename(&final_dir, &old).map_err(|e| Error::io(&final_dir, e))?;
    }
    fs::rename(&tmp_dir, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    sync_dir(dir)?;
    atomic_write(&dir.join(LATEST_FILE), format!("{name}\n").as_bytes())?;
    if replaced {
        fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    if keep_last > 0 {
        let older: Vec<(u64, PathBuf)> = list_checkpoints(dir)?
            .into_iter()
            .filter(|(s, _)| *s <= ckpt.step)
            .collect();
        let excess = older.len().saturating_sub(keep_last);
        for (step, path) in older.into_iter().take(excess) {
            // Rename first so a crash mid-delete never leaves a partial `step-N`.
            let doomed = dir.join(format!("{}.del-{pid}", step_dir_name(step)));
            fs::rename(&path, &doomed).map_err(|e| Error::io(&path, e))?;
            fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
        }
        sync_dir(dir)?;
    }
    Ok(final_dir)
}

/// Complete checkpoints in `dir` (directories named exactly `step-N`), sorted by step.
/// A missing `dir` has none.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let Some(step) = entry.file_name().to_str().and_then(parse_step_dir_name) else {
            continue;
        };
        let path = entry.path();
        if path.is_dir() {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The step directory `dir/latest` names; without a `latest` file, or when it names a
/// directory that no longer exists, the highest complete `step-N`. `None` when there is none.
pub fn latest_step_dir(dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = dir.join(LATEST_FILE);
    match fs::read_to_string(&pointer) {
        Ok(s) => {
            let name = s.trim();
            if parse_step_dir_name(name).is_none() {
                return Err(Error::format(
                    &pointer,
                    "checkpoint pointer",
                    format!("{name:?} is not `step-N`"),
                ));
            }
            let target = dir.join(name);
            if target.is_dir() {
                return Ok(Some(target));
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(pointer, e)),
    }
    Ok(list_checkpoints(dir)?.pop().map(|(_, p)| p))
}

/// Loads the latest checkpoint of `dir` (see [`latest_step_dir`]); `None` when there is none.
/// A corrupt latest checkpoint is an error, not a silent fall-back to an older one.
pub fn load_latest(dir: &Path) -> Result<Option<Checkpoint>> {
    latest_step_dir(dir)?.map(|d| load(&d)).transpose()
}

/// Removes what interrupted saves leave in `dir`: `step-N.tmp-*`, `step-N.old-*` and
/// `step-N.del-*` directories and `.latest.tmp-*` files. Call it only while no other process
/// is saving into `dir`. Returns what was removed.
pub fn remove_stale_temp(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        let stale_dir = name.split_once('.').is_some_and(|(stem, rest)| {
            parse_step_dir_name(stem).is_some() && ["tmp-", "old-", "del-"].iter().any(|p| rest.starts_with(p))
        });
        if stale_dir && path.is_dir() {
            fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
            removed.push(path);
        } else if name.starts_with(&format!(".{LATEST_FILE}.tmp-")) && path.is_file() {
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            removed.push(path);
        }
    }
    removed.sort();
    Ok(removed)
}

/// Loads one step directory. Every problem is a typed error naming the file: `Io` (missing or
/// unreadable), `Format` (bad JSON, truncated or corrupted safetensors, size or checksum
/// mismatch), `MissingField` / `InvalidField` (state.json), `MissingTensor`,
/// `UnsupportedDtype`, `NonFinite`.
pub fn load(step_dir: &Path) -> Result<Checkpoint> {
    let state_path = step_dir.join(STATE_FILE);
    let text = fs::read(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: Value = serde_json::from_slice(&text).map_err(|e| Error::format(&state_path, "JSON", e.to_string()))?;
    let f = Fields {
        path: &state_path,
        obj: state.as_object(),
    };
    let obj = f
        .obj
        .ok_or_else(|| Error::format(&state_path, "checkpoint state", "top level is not an object"))?;

    let format = f.str("format")?;
    if format != FORMAT {
        return Err(f.invalid("format", format!("{format:?}, expected {FORMAT:?}")));
    }
    let version = f.u64("format_version")?;
    if version != FORMAT_VERSION {
        return Err(f.invalid(
            "format_version",
            format!("{version}; this build reads {FORMAT_VERSION}"),
        ));
    }
    let step = f.u64("step")?;
    if let Some(dir_step) = step_dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_step_dir_name)
    {
        if dir_step != step {
            return Err(f.invalid("step", format!("{step}, but the directory is step-{dir_step}")));
        }
    }
    let rng_v = f.get("rng")?;
    let rng_a = rng_v
        .as_array()
        .filter(|a| a.len() == 4)
        .ok_or_else(|| f.invalid("rng", "not an array of 4 unsigned integers".into()))?;
    let mut rng = [0u64; 4];
    for (r, v) in rng.iter_mut().zip(rng_a) {
        *r = v
            .as_u64()
            .ok_or_else(|| f.invalid("rng", format!("{v} is not an unsigned 64-bit integer")))?;
    }
    let schedule = schedule_from_json(&f, f.get("schedule")?)?;
    let optimizer = adamw_from_json(&f, f.get("optimizer")?)?;
    let config = obj.get("config").cloned().unwrap_or(Value::Null);

    let trainable = read_tensor_file(&f, step_dir, TRAINABLE_FILE, "trainable")?;
    let optimizer_state = read_tensor_file(&f, step_dir, OPTIMIZER_FILE, "optimizer_tensors")?;

    Ok(Checkpoint {
        step,
        micro_step: f.u64("micro_step")?,
        epoch: f.u64("epoch")?,
        data_cursor: f.u64("data_cursor")?,
        rng,
        schedule,
        optimizer,
        config,
        trainable,
        optimizer_state,
    })
}

/// FNV-1a (64-bit) of `bytes`, the checksum recorded in state.json.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

// ---------------------------------------------------------------------------------------------

fn step_dir_name(step: u64) -> String {
    format!("step-{step}")
}

/// `step-N` with N plain decimal digits; anything else (temp names) is `None`.
fn parse_step_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

fn validate_tensors(what: &str, tensors: &[NamedTensor]) -> Result<()> {
    let mut names = std::collections::HashSet::new();
    for (name, shape, data) in tensors {
        if name.is_empty() || name.starts_with("__") {
            return Err(Error::Input(format!("{what} tensor name {name:?} is not allowed")));
        }
        if !names.insert(name.as_str()) {
            return Err(Error::Input(format!("{what} tensor `{name}` appears twice")));
        }
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if numel != Some(data.len()) {
            return Err(Error::Input(format!(
                "{what} tensor `{name}`: shape {shape:?} but {} values",
                data.len()
            )));
        }
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite(format!(
                "{what} tensor `{name}` at index {i} (not saved)"
            )));
        }
    }
    Ok(())
}

fn serialize(tensors: &[NamedTensor]) -> std::result::Result<Vec<u8>, safetensors::SafeTensorError> {
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
                .map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    safetensors::tensor::serialize(views, None)
}

/// Floats are written as decimal strings (Rust's shortest round-trip form) because serde_json's
/// default number parser is not guaranteed to round-trip every f64; `"5e-5"` reads back exactly.
fn f64_str(x: f64) -> Value {
    Value::String(format!("{x:?}"))
}

fn state_json(ckpt: &Checkpoint, trainable: &[u8], optimizer: &[u8]) -> Value {
    let schedule = match ckpt.schedule {
        Schedule::Constant => json!({"kind": "constant"}),
        Schedule::LinearWarmup { warmup_steps } => json!({"kind": "linear_warmup", "warmup_steps": warmup_steps}),
        Schedule::WarmupCosine {
            warmup_steps,
            total_steps,
            min_lr_ratio,
        } => json!({
            "kind": "warmup_cosine",
            "warmup_steps": warmup_steps,
            "total_steps": total_steps,
            "min_lr_ratio": f64_str(min_lr_ratio),
        }),
    };
    let o = &ckpt.optimizer;
    let names = |t: &[NamedTensor]| t.iter().map(|(n, _, _)| Value::from(n.as_str())).collect::<Vec<_>>();
    let file = |b: &[u8]| json!({"bytes": b.len(), "fnv1a64": format!("{:016x}", fnv1a64(b))});
    json!({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": ckpt.step,
        "micro_step": ckpt.micro_step,
        "epoch": ckpt.epoch,
        "data_cursor": ckpt.data_cursor,
        "rng": ckpt.rng.to_vec(),
        "schedule": schedule,
        "optimizer": {
            "kind": "adamw",
            "lr": f64_str(o.lr),
            "beta1": f64_str(o.beta1),
            "beta2": f64_str(o.beta2),
            "eps": f64_str(o.eps),
            "weight_decay": f64_str(o.weight_decay),
        },
        "config": ckpt.config,
        "trainable": names(&ckpt.trainable),
        "optimizer_tensors": names(&ckpt.optimizer_state),
        "files": {
            TRAINABLE_FILE: file(trainable),
            OPTIMIZER_FILE: file(optimizer),
        },
    })
}

/// Field access on state.json with errors naming the file and the (dotted) field.
struct Fields<'a> {
    path: &'a Path,
    obj: Option<&'a Map<String, Value>>,
}

impl<'a> Fields<'a> {
    fn sub(&self, field: &str, v: &'a Value) -> Result<Fields<'a>> {
        match v.as_object() {
            Some(obj) => Ok(Fields {
                path: self.path,
                obj: Some(obj),
            }),
            None => Err(self.invalid(field, "not an object".into())),
        }
    }
    fn get(&self, field: &str) -> Result<&'a Value> {
        self.obj.and_then(|o| o.get(field)).ok_or_else(|| Error::MissingField {
            path: self.path.to_path_buf(),
            field: field.to_string(),
        })
    }
    fn invalid(&self, field: &str, msg: String) -> Error {
        Error::InvalidField {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            msg,
        }
    }
    fn u64(&self, field: &str) -> Result<u64> {
        let v = self.get(field)?;
        v.as_u64()
            .ok_or_else(|| self.invalid(field, format!("{v} is not an unsigned integer")))
    }
    fn str(&self, field: &str) -> Result<&'a str> {
        let v = self.get(field)?;
        v.as_str()
            .ok_or_else(|| self.invalid(field, format!("{v} is not a string")))
    }
    fn f64(&self, field: &str) -> Result<f64> {
        let s = self.str(field)?;
        s.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| self.invalid(field, format!("{s:?} is not a finite number")))
    }
    fn names(&self, field: &str) -> Result<Vec<&'a str>> {
        let v = self.get(field)?;
        v.as_array()
            .and_then(|a| a.iter().map(|n| n.as_str()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.invalid(field, "not an array of tensor names".into()))
    }
}

fn schedule_from_json(f: &Fields, v: &Value) -> Result<Schedule> {
    let s = f.sub("schedule", v)?;
    let kind = s.str("kind").map_err(|e| prefix(e, "schedule."))?;
    let sched = match kind {
        "constant" => Schedule::Constant,
        "linear_warmup" => Schedule::LinearWarmup {
            warmup_steps: s.u64("warmup_steps").map_err(|e| prefix(e, "schedule."))?,
        },
        "warmup_cosine" => Schedule::WarmupCosine {
            warmup_steps: s.u64("warmup_steps").map_err(|e| prefix(e, "schedule."))?,
            total_steps: s.u64("total_steps").map_err(|e| prefix(e, "schedule."))?,
            min_lr_ratio: s.f64("min_lr_ratio").map_err(|e| prefix(e, "schedule."))?,
        },
        other => return Err(f.invalid("schedule.kind", format!("unknown schedule {other:?}"))),
    };
    sched.validate().map_err(|e| f.invalid("schedule", e.to_string()))?;
    Ok(sched)
}

fn adamw_from_json(f: &Fields, v: &Value) -> Result<AdamW> {
    let o = f.sub("optimizer", v)?;
    let kind = o.str("kind").map_err(|e| prefix(e, "optimizer."))?;
    if kind != "adamw" {
        return Err(f.invalid("optimizer.kind", format!("unknown optimizer {kind:?}")));
    }
    let g = |name: &str| o.f64(name).map_err(|e| prefix(e, "optimizer."));
    let cfg = AdamW {
        lr: g("lr")?,
        beta1: g("beta1")?,
        beta2: g("beta2")?,
        eps: g("eps")?,
        weight_decay: g("weight_decay")?,
    };
    cfg.validate().map_err(|e| f.invalid("optimizer", e.to_string()))?;
    Ok(cfg)
}

/// Prefixes the field of a field error with its parent object's name.
fn prefix(e: Error, parent: &str) -> Error {
    match e {
        Error::MissingField { path, field } => Error::MissingField {
            path,
            field: format!("{parent}{field}"),
        },
        Error::InvalidField { path, field, msg } => Error::InvalidField {
            path,
            field: format!("{parent}{field}"),
            msg,
        },
        e => e,
    }
}

/// Reads `step_dir/file`, checks its size and checksum against state.json's `files` record,
/// parses it and returns the tensors named in state.json's `names_field`, in that order.
fn read_tensor_file(f: &Fields, step_dir: &Path, file: &str, names_field: &str) -> Result<Vec<NamedTensor>> {
    let names = f.names(names_field)?;
    let files = f.sub("files", f.get("files")?)?;
    let rec = files.sub(
        &format!("files.{file}"),
        files.get(file).map_err(|e| prefix(e, "files."))?,
    )?;
    let want_bytes = rec.u64("bytes").map_err(|e| prefix(e, &format!("files.{file}.")))?;
    let want_sum = rec.str("fnv1a64").map_err(|e| prefix(e, &format!("files.{file}.")))?;

    let path = step_dir.join(file);
    let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
    if bytes.len() as u64 != want_bytes {
        return Err(Error::format(
            &path,
            "safetensors",
            format!(
                "{} bytes, but state.json records {want_bytes} (truncated or replaced)",
                bytes.len()
            ),
        ));
    }
    let sum = format!("{:016x}", fnv1a64(&bytes));
    if sum != want_sum {
        return Err(Error::format(
            &path,
            "safetensors",
            format!("FNV-1a checksum {sum} differs from state.json's {want_sum} (corrupted)"),
        ));
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::format(&path, "safetensors", e.to_string()))?;
    if st.len() != names.len() {
        return Err(Error::format(
            &path,
            "safetensors",
            format!(
                "{} tensors, but state.json lists {} in `{names_field}`",
                st.len(),
                names.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let t = st.tensor(name).map_err(|_| Error::MissingTensor {
            path: path.clone(),
            tensor: name.to_string(),
        })?;
        if t.dtype() != Dtype::F32 {
            return Err(Error::UnsupportedDtype {
                path: path.clone(),
                tensor: name.to_string(),
                dtype: format!("{:?}", t.dtype()),
            });
        }
        let data: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite(format!(
                "{}: tensor `{name}` at index {i}",
                path.display()
            )));
        }
        out.push((name.to_string(), t.shape().to_vec(), data));
    }
    Ok(out)
}
