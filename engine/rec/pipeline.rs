//! The recommendation job: a TOML config, training (SFT or ILRec) on a data set's leave-one-out
//! split with semantic-ID item tokens, and full-ranking evaluation by trie-constrained beam
//! search. Everything evaluation needs (adapter, item tokens' rows, semantic IDs) is written to
//! the run's output directory.
use super::beam::{recommend, BeamOptions};
use super::beam_device::recommend_cuda;
use super::trie::FlatTrie;
use crate::backend::cuda::model::CudaModel;
use crate::backend::cuda::ops::beam::DeviceTrie;
use super::data::{leave_one_out, load_lcrec, load_recbole, load_recbole_presplit, Dataset, Sample, Split, DEFAULT_MAX_HISTORY};
use crate::progress::Progress;
use super::metrics::Metrics;
use super::prompt::{PromptBuilder, PromptTemplate};
use super::reward::{item_distribution, RewardTable};
use super::sasrec::{SasRec, SasRecConfig};
use super::semantic_id::{add_item_tokens, assign_semantic_ids, item_embeddings, SemanticIdConfig, SemanticIds, SEMANTIC_IDS_FILE};
use super::trie::ItemTrie;
use crate::backend::cuda::Elem;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::rng::Rng;
use crate::train::backprop::Objective;
use crate::train::checkpoint::atomic_write;
use crate::train::lora::Lora;
use crate::train::loss::{CpdDirection, IlrecParams, NegSource, NegWeight};
use crate::train::trainer::{Example, StepReport, TrainConfig, Trainer};
use crate::weights::TextTokenizer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the data come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// `recbole` (atomic .inter/.item), `recbole_presplit` (.train/.valid/.test.inter + .text)
    /// or `lcrec` (inter/item/index JSON).
    pub format: String,
    pub dir: PathBuf,
    pub name: String,
    pub max_history: usize,
    /// Train on a seeded subsample of this many training samples (0: all).
    pub max_train_samples: usize,
    /// Evaluate a seeded subsample of this many users (0: all).
    pub max_eval_users: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig { format: "recbole".into(), dir: "data/ml-100k".into(), name: "ml-100k".into(), max_history: DEFAULT_MAX_HISTORY, max_train_samples: 0, max_eval_users: 0 }
    }
}

/// How items are named.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdsConfig {
    /// `semantic` (built by the engine), `lcrec_index` (the data set's index.json) or `title`
    /// (plain-text titles, BIGRec style: no new tokens, ILRec candidates = the whole vocabulary).
    pub kind: String,
    pub levels: usize,
    pub codes: usize,
    pub kmeans_iters: usize,
    /// Item text tokens embedded per item.
    pub max_text_tokens: usize,
    pub seed: u64,
    /// Reuse the semantic IDs in this file when it exists, else build them and write it too:
    /// runs that differ only in method or seed then share one mapping (and skip embedding).
    pub cache: Option<PathBuf>,
    /// Start the new code tokens' LM-head rows at the existing vocabulary's log-sum-exp on
    /// (up to 64) training response positions (`Model::match_new_token_logits`); else at the
    /// average token's logit.
    pub match_logits: bool,
}

impl Default for IdsConfig {
    fn default() -> Self {
        IdsConfig { kind: "semantic".into(), levels: 3, codes: 256, kmeans_iters: 50, max_text_tokens: 64, seed: 42, cache: None, match_logits: true }
    }
}

/// ILRec hyper-parameters (ILREC.md section 7 defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IlrecConfig {
    pub alpha: f32,
    pub beta: f32,
    pub lambda: f32,
    pub mu: f32,
    /// Probe the `k` blocks just below the last (ignored when `layers` is set).
    pub k: usize,
    /// Explicit 1-based probed blocks.
    pub layers: Vec<usize>,
    /// `prob` or `logit`.
    pub neg_weight: String,
    /// `forward` or `reverse`.
    pub cpd_direction: String,
    /// Where the self-hard negatives come from: `intermediate` (ILRec) or `final` (ablation).
    pub negatives: String,
    /// SASRec weights giving the CRR rewards (`mu > 0`): used when the file exists, else
    /// trained per `[sasrec]` on the same split and written there. Default:
    /// `output_dir/sasrec.safetensors`.
    pub cf_model: Option<PathBuf>,
}

impl Default for IlrecConfig {
    fn default() -> Self {
        let p = IlrecParams::default();
        IlrecConfig { alpha: p.alpha, beta: p.beta, lambda: p.lambda, mu: p.mu, k: 4, layers: vec![], neg_weight: "prob".into(), cpd_direction: "forward".into(), negatives: "intermediate".into(), cf_model: None }
    }
}

/// Decoding settings of the evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    pub beam: usize,
    pub top_k: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { beam: 20, top_k: 10 }
    }
}

/// A whole run, read from TOML (`ilrec train --config FILE`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub model_dir: PathBuf,
    /// Use only the first `model_blocks` transformer blocks (0: all): a layer-truncated model
    /// for CPU-scale runs; the final norm and LM head are kept.
    pub model_blocks: usize,
    pub output_dir: PathBuf,
    /// `sft` or `ilrec`.
    pub method: String,
    pub data: DataConfig,
    pub ids: IdsConfig,
    pub prompt: PromptTemplate,
    pub train: TrainConfig,
    pub ilrec: IlrecConfig,
    pub sasrec: SasRecConfig,
    pub eval: EvalConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            model_dir: "weights/smollm2-135m".into(),
            model_blocks: 0,
            output_dir: "runs/default".into(),
            method: "ilrec".into(),
            data: DataConfig::default(),
            ids: IdsConfig::default(),
            prompt: PromptTemplate::default(),
            train: TrainConfig::default(),
            ilrec: IlrecConfig::default(),
            sasrec: SasRecConfig::default(),
            eval: EvalConfig::default(),
        }
    }
}

impl RunConfig {
    /// Reads a TOML config; unknown keys are errors naming the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::format(path, "TOML", e.to_string()))
    }

    fn objective(&self, model: &Model, candidates: Vec<u32>) -> Result<Objective> {
        match self.method.as_str() {
            "sft" => Ok(Objective::Sft),
            "ilrec" => {
                let c = &self.ilrec;
                let n = model.config.num_layers;
                let layers = if c.layers.is_empty() {
                    if c.k == 0 || c.k >= n {
                        return Err(Error::InvalidField { path: "config".into(), field: "ilrec.k".into(), msg: format!("need 0 < k < {n} blocks") });
                    }
                    (n - c.k..n).collect()
                } else {
                    c.layers.clone()
                };
                let neg_weight = match c.neg_weight.as_str() {
                    "prob" => NegWeight::Prob,
                    "logit" => NegWeight::Logit,
                    o => return Err(Error::InvalidField { path: "config".into(), field: "ilrec.neg_weight".into(), msg: format!("`{o}` (prob | logit)") }),
                };
                let cpd_direction = match c.cpd_direction.as_str() {
                    "forward" => CpdDirection::Forward,
                    "reverse" => CpdDirection::Reverse,
                    o => return Err(Error::InvalidField { path: "config".into(), field: "ilrec.cpd_direction".into(), msg: format!("`{o}` (forward | reverse)") }),
                };
                let negatives = match c.negatives.as_str() {
                    "intermediate" => NegSource::Intermediate,
                    "final" => NegSource::Final,
                    o => return Err(Error::InvalidField { path: "config".into(), field: "ilrec.negatives".into(), msg: format!("`{o}` (intermediate | final)") }),
                };
                let params = IlrecParams { alpha: c.alpha, beta: c.beta, lambda: c.lambda, mu: c.mu, neg_weight, cpd_direction, negatives };
                Ok(Objective::Ilrec { params, layers, candidates })
            }
            o => Err(Error::InvalidField { path: "config".into(), field: "method".into(), msg: format!("`{o}` (sft | ilrec)") }),
        }
    }
}

/// Loads the configured data set.
pub fn load_dataset(c: &DataConfig) -> Result<Dataset> {
    match c.format.as_str() {
        "recbole" => load_recbole(&c.dir, &c.name),
        "recbole_presplit" => load_recbole_presplit(&c.dir, &c.name),
        "lcrec" => load_lcrec(&c.dir, &c.name),
        o => Err(Error::InvalidField { path: "config".into(), field: "data.format".into(), msg: format!("`{o}` (recbole | recbole_presplit | lcrec)") }),
    }
}

/// A seeded subsample of `n` items of `v` (all when `n == 0` or `n >= len`), order kept.
fn subsample<T: Clone>(v: &[T], n: usize, seed: u64) -> Vec<T> {
    if n == 0 || n >= v.len() {
        return v.to_vec();
    }
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let mut rng = Rng::new(seed);
    for i in (1..idx.len()).rev() {
        idx.swap(i, rng.below(i + 1));
    }
    let mut keep = idx[..n].to_vec();
    keep.sort_unstable();
    keep.into_iter().map(|i| v[i].clone()).collect()
}

/// Title mode (`ids.kind = "title"`, BIGRec style): items are named by their titles in plain
/// text, no token is added, and ILRec's candidates are the whole vocabulary (ILREC.md section 2).
fn title_mode(cfg: &RunConfig) -> bool {
    cfg.ids.kind == "title"
}

/// Every item's title, made unique by appending " (2)", " (3)", ... to later repeats (in item
/// order), since the trie needs one token sequence per item.
pub fn title_identifiers(ds: &Dataset) -> Vec<String> {
    let mut used = std::collections::HashSet::new();
    ds.items
        .iter()
        .map(|it| {
            let t = it.title.trim();
            let mut name = t.to_string();
            let mut k = 1;
            while !used.insert(name.clone()) {
                k += 1;
                name = format!("{t} ({k})");
            }
            name
        })
        .collect()
}

/// The trie's item sequences: the identifier tokens, plus EOS in title mode, where a title can
/// be a prefix of another (semantic IDs all have the same length).
fn trie_items(pb: &PromptBuilder, title: bool) -> Vec<Vec<u32>> {
    pb.item_tokens.iter().map(|t| if title { t.iter().copied().chain([pb.eos]).collect() } else { t.clone() }).collect()
}

fn semantic_ids(cfg: &RunConfig, ds: &Dataset, model: &Model, tok: &TextTokenizer, log: &mut dyn FnMut(&str)) -> Result<SemanticIds> {
    if let Some(path) = cfg.ids.cache.as_ref().filter(|p| p.exists()) {
        let ids = SemanticIds::load(path)?;
        if ids.num_items() != ds.items.len() {
            return Err(Error::InvalidField {
                path: path.clone(),
                field: "ids.cache".into(),
                msg: format!("holds {} items, the data set {} has {}", ids.num_items(), ds.name, ds.items.len()),
            });
        }
        log(&format!("semantic IDs from {}", path.display()));
        return Ok(ids);
    }
    let ids = match cfg.ids.kind.as_str() {
        "lcrec_index" => {
            let map = ds.semantic_ids.clone().ok_or_else(|| Error::InvalidField {
                path: cfg.data.dir.clone(),
                field: "ids.kind".into(),
                msg: "lcrec_index needs a data set with an index.json".into(),
            })?;
            SemanticIds::from_lcrec_index_disambiguated(map)?
        }
        "semantic" => {
            let texts = ds.items.iter().map(|it| tok.encode(&it.text)).collect::<Result<Vec<_>>>()?;
            log(&format!("embedding {} item texts with the model ...", texts.len()));
            let bar = Progress::new(texts.len() as u64, "item embeddings");
            let mut progress = |done: usize, _total: usize| bar.set(done as u64, "");
            let emb = item_embeddings(model, &texts, 16, cfg.ids.max_text_tokens, Some(&mut progress))?;
            bar.finish();
            let sc = SemanticIdConfig { levels: cfg.ids.levels, codes: cfg.ids.codes, iters: cfg.ids.kmeans_iters, seed: cfg.ids.seed, ..Default::default() };
            log(&format!("residual k-means: {} levels x {} codes", sc.levels, sc.codes));
            assign_semantic_ids(&emb, model.config.hidden_size, &sc)?
        }
        o => return Err(Error::InvalidField { path: "config".into(), field: "ids.kind".into(), msg: format!("`{o}` (semantic | lcrec_index | title)") }),
    };
    if let Some(path) = &cfg.ids.cache {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        ids.save(path)?;
    }
    Ok(ids)
}

fn builder(model: &Model, tok: &TextTokenizer, template: &PromptTemplate, idents: &[String]) -> Result<PromptBuilder> {
    let eos = tok.eos_id().or(model.config.eos_token_ids.first().copied()).ok_or_else(|| Error::Tokenizer {
        path: PathBuf::from("tokenizer_config.json"),
        msg: "no EOS token".into(),
    })?;
    PromptBuilder::new(tok, template, idents, eos)
}

/// The configured model: loaded, truncated to `model_blocks` when set.
fn load_model(cfg: &RunConfig) -> Result<Model> {
    let mut model = Model::load(&cfg.model_dir)?;
    if cfg.model_blocks > 0 {
        model.keep_blocks(cfg.model_blocks).map_err(|e| Error::InvalidField { path: "config".into(), field: "model_blocks".into(), msg: e.to_string() })?;
    }
    Ok(model)
}

/// The data set and its leave-one-out split.
fn load_split(cfg: &RunConfig) -> Result<(Dataset, Split)> {
    let ds = load_dataset(&cfg.data)?;
    let split = leave_one_out(&ds, cfg.data.max_history);
    Ok((ds, split))
}

const TOKEN_ROWS_FILE: &str = "item_token_rows.safetensors";
const ADAPTER_DIR: &str = "adapter";
const SASREC_FILE: &str = "sasrec.safetensors";

impl RunConfig {
    /// Where the CRR model lives (`ilrec.cf_model`, default `output_dir/sasrec.safetensors`).
    pub fn cf_model_path(&self) -> PathBuf {
        self.ilrec.cf_model.clone().unwrap_or_else(|| self.output_dir.join(SASREC_FILE))
    }
}

/// The SASRec of this run: loaded from [`RunConfig::cf_model_path`] when it exists, else
/// trained per `[sasrec]` on the training split and written there.
pub fn cf_model(cfg: &RunConfig, split: &Split, n_items: usize, log: &mut dyn FnMut(&str)) -> Result<SasRec> {
    let path = cfg.cf_model_path();
    if path.exists() {
        log(&format!("SASRec from {}", path.display()));
        return SasRec::load(&path);
    }
    log(&format!("training SASRec ({} epochs) on {} training samples", cfg.sasrec.epochs, split.train.len()));
    let bar = Progress::new(cfg.sasrec.epochs as u64, "SASRec epochs");
    let sas = SasRec::train(&split.train, n_items, &cfg.sasrec, &mut |e, _n, loss| bar.set(e as u64, &format!("loss {loss:.4}")))?;
    bar.finish();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    sas.save(&path)?;
    log(&format!("wrote {}", path.display()));
    Ok(sas)
}

/// CRR rewards of every example (ILREC.md section 6), computed once before training.
fn attach_rewards(data: &mut [Example], samples: &[Sample], sas: &SasRec, pb: &PromptBuilder, candidates: &[u32]) -> Result<()> {
    let table = RewardTable::new(&pb.item_tokens, candidates)?;
    for (exs, ss) in data.chunks_mut(256).zip(samples.chunks(256)) {
        let hists: Vec<&[u32]> = ss.iter().map(|s| s.history.as_slice()).collect();
        let scores = sas.scores_batch(&hists)?;
        for ((ex, s), sc) in exs.iter_mut().zip(ss).zip(&scores) {
            ex.rewards = Some(table.rewards(&item_distribution(sc), s.target as usize, ex.targets.len())?);
        }
    }
    Ok(())
}

/// Trains per `cfg`, writing the adapter, the semantic IDs and the item tokens' rows into
/// `cfg.output_dir`; `on_step` sees every optimizer step.
pub fn run_train(cfg: &RunConfig, log: &mut dyn FnMut(&str), on_step: &mut dyn FnMut(&StepReport)) -> Result<()> {
    run_train_on(cfg, &Device::Cpu, log, on_step)
}

/// [`run_train`] with the micro-batches' forward and backward on `device` (the optimiser and
/// the data pipeline stay on the host). On CUDA the model's projection weights are bf16.
pub fn run_train_on(cfg: &RunConfig, device: &Device, log: &mut dyn FnMut(&str), on_step: &mut dyn FnMut(&StepReport)) -> Result<()> {
    let mut model = load_model(cfg)?;
    let mut tok = TextTokenizer::load(&cfg.model_dir)?;
    let (ds, split) = load_split(cfg)?;
    log(&format!("{}: {} users, {} items; {} train / {} valid / {} test samples", ds.name, ds.users.len(), ds.items.len(), split.train.len(), split.valid.len(), split.test.len()));
    let title = title_mode(cfg);
    let (ids, new, idents) = if title {
        let first = tok.vocab_size() as u32;
        (None, first..first, title_identifiers(&ds))
    } else {
        let ids = semantic_ids(cfg, &ds, &model, &tok, log)?;
        let first = add_item_tokens(&mut model, &mut tok, &ids, cfg.ids.seed)?;
        let idents = (0..ids.num_items()).map(|i| ids.id_string(i)).collect();
        let new = first..first + ids.num_tokens() as u32;
        (Some(ids), new, idents)
    };
    let pb = builder(&model, &tok, &cfg.prompt, &idents)?;
    let train = subsample(&split.train, cfg.data.max_train_samples, cfg.train.seed);
    let mut data = train.iter().map(|s: &Sample| pb.example(&s.history, s.target)).collect::<Result<Vec<Example>>>()?;
    let new_tokens: Vec<u32> = new.clone().collect();
    let candidates: Vec<u32> = if title { (0..model.config.vocab_size as u32).collect() } else { new_tokens.clone() };
    let objective = cfg.objective(&model, candidates.clone())?;
    if matches!(&objective, Objective::Ilrec { params, .. } if params.mu > 0.0) {
        let sas = cf_model(cfg, &split, ds.items.len(), log)?;
        attach_rewards(&mut data, &train, &sas, &pb, &candidates)?;
        log("CRR rewards computed from SASRec through the item trie");
    }
    if cfg.ids.match_logits && !new.is_empty() {
        let probe = &data[..data.len().min(64)];
        let seqs: Vec<Vec<u32>> = probe.iter().map(|e| e.tokens.clone()).collect();
        let pos: Vec<Vec<usize>> = probe.iter().map(|e| e.loss_positions.clone()).collect();
        let t = model.match_new_token_logits(new.clone(), &seqs, &pos)?;
        log(&format!("new token rows lifted to the vocabulary's log-sum-exp ({t:.2}) on {} samples", probe.len()));
    }
    let tokens: usize = data.iter().map(|e| e.tokens.len()).sum();
    log(&format!(
        "training {} on {} samples ({tokens} tokens, {} blocks; {} item tokens added, ids {new:?})",
        cfg.method,
        data.len(),
        model.config.num_layers,
        new_tokens.len(),
    ));
    std::fs::create_dir_all(&cfg.output_dir).map_err(|e| Error::io(&cfg.output_dir, e))?;
    if let Some(ids) = &ids {
        ids.save(&cfg.output_dir.join(SEMANTIC_IDS_FILE))?;
    }
    let ckpt = cfg.output_dir.join("checkpoints");
    let mut tr = Trainer::new(&model, cfg.train.clone(), data.len(), new_tokens.clone())?;
    if tr.resume(&mut model, &ckpt)? {
        log(&format!("resumed from {} at step {}", ckpt.display(), tr.step_count()));
    }
    if let Device::Cuda(cuda) = device {
        tr.use_cuda(cuda, &model, Elem::BF16)?;
        log(&format!("training micro-batches on {device} (bf16 weights)"));
    }
    if matches!(objective, Objective::Ilrec { .. }) && !tr.is_done() {
        // What the method costs over plain SFT on this device (ENGINE.md's step-time ratio).
        let reps = if matches!(device, Device::Cuda(_)) { 3 } else { 1 };
        let c = tr.time_against_sft(&model, &data, &objective, reps)?;
        log(&format!(
            "step time per micro-batch of {} tokens on {device}: ILRec {:.1} ms ({:.0} tok/s), SFT {:.1} ms ({:.0} tok/s); ILRec/SFT step-time ratio {:.3}",
            c.tokens,
            c.objective_s * 1e3,
            c.tokens as f64 / c.objective_s,
            c.sft_s * 1e3,
            c.tokens as f64 / c.sft_s,
            c.ratio()
        ));
    }
    while !tr.is_done() {
        let rep = tr.train_step(&mut model, &data, &objective)?;
        on_step(&rep);
        let every = cfg.train.checkpoint_every;
        if (every > 0 && tr.step_count() % every == 0) || tr.is_done() {
            tr.save(&ckpt)?;
        }
    }
    tr.lora.save_peft(&cfg.output_dir.join(ADAPTER_DIR), &cfg.model_dir.display().to_string())?;
    if new_tokens.is_empty() {
        log(&format!("wrote {}", cfg.output_dir.display()));
        return Ok(());
    }
    let h = model.config.hidden_size;
    let rows: Vec<f32> = new_tokens.iter().flat_map(|&t| model.embed[t as usize * h..(t as usize + 1) * h].iter().copied()).collect();
    let mut tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = vec![("embed_rows", vec![new_tokens.len(), h], rows)];
    if let Some(head) = &model.lm_head {
        let hr: Vec<f32> = new_tokens.iter().flat_map(|&t| head.w[t as usize * h..(t as usize + 1) * h].iter().copied()).collect();
        tensors.push(("head_rows", vec![new_tokens.len(), h], hr));
    }
    let bytes = crate::weights::safetensors::serialize_f32(tensors.iter().map(|(n, s, d)| (*n, s.as_slice(), d.as_slice())))?;
    atomic_write(&cfg.output_dir.join(TOKEN_ROWS_FILE), &bytes)?;
    log(&format!("wrote {}", cfg.output_dir.display()));
    Ok(())
}

/// A trained run, ready to recommend: the merged model, its prompt builder, the item trie and
/// the data set.
pub struct TrainedRun {
    pub model: Model,
    pub prompts: PromptBuilder,
    pub trie: ItemTrie,
    pub dataset: Dataset,
    pub split: Split,
    pub beam: BeamOptions,
    /// The merged model and the trie on the GPU, when [`TrainedRun::use_device`] chose CUDA.
    cuda: Option<(CudaModel, DeviceTrie)>,
}

impl TrainedRun {
    /// Loads the run of `cfg` from its output directory (adapter merged into the base).
    pub fn load(cfg: &RunConfig) -> Result<Self> {
        let mut model = load_model(cfg)?;
        let mut tok = TextTokenizer::load(&cfg.model_dir)?;
        let (ds, split) = load_split(cfg)?;
        let title = title_mode(cfg);
        let idents = if title {
            title_identifiers(&ds)
        } else {
            let ids = SemanticIds::load(&cfg.output_dir.join(SEMANTIC_IDS_FILE))?;
            if ids.num_items() != ds.items.len() {
                return Err(Error::Input(format!("{} has {} items, the data set {}", cfg.output_dir.join(SEMANTIC_IDS_FILE).display(), ids.num_items(), ds.items.len())));
            }
            let first = add_item_tokens(&mut model, &mut tok, &ids, cfg.ids.seed)?;
            let rows_path = cfg.output_dir.join(TOKEN_ROWS_FILE);
            let st = crate::weights::SafetensorsSet::open_files(&[rows_path])?;
            let (n, h) = (ids.num_tokens(), model.config.hidden_size);
            let embed = st.get_f32("embed_rows", &[n, h])?;
            let head = if model.lm_head.is_some() { Some(st.get_f32("head_rows", &[n, h])?) } else { None };
            model.write_token_rows(first, &embed, head.as_deref())?;
            (0..ids.num_items()).map(|i| ids.id_string(i)).collect()
        };
        let lora = Lora::load_peft(&cfg.output_dir.join(ADAPTER_DIR), &model)?;
        lora.merge_into(&mut model)?;
        let prompts = builder(&model, &tok, &cfg.prompt, &idents)?;
        let trie = ItemTrie::new(&trie_items(&prompts, title))?;
        let beam = BeamOptions { beam: cfg.eval.beam, top_k: cfg.eval.top_k.max(10).min(cfg.eval.beam), ..Default::default() };
        Ok(TrainedRun { model, prompts, trie, dataset: ds, split, beam, cuda: None })
    }

    /// Runs the beam search on `device` from now on: for CUDA the merged model is uploaded once in
    /// bf16 and the trie flattened and uploaded once.
    pub fn use_device(&mut self, device: &Device) -> Result<()> {
        self.cuda = match device {
            Device::Cpu => None,
            Device::Cuda(cuda) => {
                let flat = FlatTrie::new(&self.trie, self.model.config.vocab_size)?;
                Some((CudaModel::upload(cuda, &self.model, Elem::BF16)?, DeviceTrie::new(cuda, &flat)?))
            }
        };
        Ok(())
    }

    /// Ranked recommendations (item index, score) for each history (dense item ids).
    pub fn recommend(&self, histories: &[&[u32]]) -> Result<Vec<Vec<(u32, f32)>>> {
        let prompts = histories.iter().map(|h| self.prompts.prompt(h)).collect::<Result<Vec<_>>>()?;
        let recs = match &self.cuda {
            None => recommend(&self.model, &self.trie, &prompts, &self.beam)?,
            Some((model, trie)) => recommend_cuda(model, trie, &prompts, &self.beam)?,
        };
        Ok(recs.into_iter().map(|r| r.into_iter().map(|x| (x.item, x.score)).collect()).collect())
    }
}

/// The evaluation users of `split_name` (`valid` | `test`), subsampled per `data.max_eval_users`.
pub fn eval_samples(cfg: &RunConfig, split: &Split, split_name: &str) -> Result<Vec<Sample>> {
    let samples = match split_name {
        "valid" => &split.valid,
        "test" => &split.test,
        o => return Err(Error::Input(format!("split `{o}` (valid | test)"))),
    };
    Ok(subsample(samples, cfg.data.max_eval_users, cfg.train.seed ^ 0x5EED))
}

/// Evaluates the trained run of `cfg` on `split` (`valid` or `test`): full ranking by beam
/// search over every item, Hit@5/10 and NDCG@5/10; `progress(done, total)` per chunk.
pub fn run_eval(cfg: &RunConfig, split_name: &str, progress: &mut dyn FnMut(usize, usize)) -> Result<Metrics> {
    run_eval_on(cfg, split_name, &Device::Cpu, progress)
}

/// [`run_eval`] with the beam search on `device`.
pub fn run_eval_on(cfg: &RunConfig, split_name: &str, device: &Device, progress: &mut dyn FnMut(usize, usize)) -> Result<Metrics> {
    let mut run = TrainedRun::load(cfg)?;
    run.use_device(device)?;
    let samples = eval_samples(cfg, &run.split, split_name)?;
    let mut metrics = Metrics::default();
    let chunk = 8;
    for (ci, part) in samples.chunks(chunk).enumerate() {
        let hists: Vec<&[u32]> = part.iter().map(|s| s.history.as_slice()).collect();
        let recs = run.recommend(&hists)?;
        for (s, r) in part.iter().zip(&recs) {
            let ranked: Vec<u32> = r.iter().map(|x| x.0).collect();
            metrics.add(&ranked, s.target);
        }
        progress(((ci + 1) * chunk).min(samples.len()), samples.len());
    }
    Ok(metrics)
}

/// The SASRec baseline row: the run's CF model (trained when absent) evaluated by full ranking
/// on the same users as [`run_eval`].
pub fn run_sasrec(cfg: &RunConfig, split_name: &str, log: &mut dyn FnMut(&str)) -> Result<Metrics> {
    let (ds, split) = load_split(cfg)?;
    let sas = cf_model(cfg, &split, ds.items.len(), log)?;
    let samples = eval_samples(cfg, &split, split_name)?;
    sas.evaluate(&samples)
}

/// Items ranked by their number of training interactions (every item of a kept user's sequence
/// but the last two), ties by lower id: the MostPop sanity baseline.
pub fn most_popular(ds: &Dataset) -> Vec<u32> {
    let mut count = vec![0usize; ds.items.len()];
    for seq in ds.sequences.iter().filter(|s| s.len() >= super::data::MIN_INTERACTIONS) {
        for &i in &seq[..seq.len() - 2] {
            count[i as usize] += 1;
        }
    }
    let mut order: Vec<u32> = (0..ds.items.len() as u32).collect();
    order.sort_by(|&a, &b| count[b as usize].cmp(&count[a as usize]).then(a.cmp(&b)));
    order
}

/// The MostPop row: the same ranking for every user, evaluated on the same users as
/// [`run_eval`].
pub fn run_most_popular(cfg: &RunConfig, split_name: &str) -> Result<Metrics> {
    let (ds, split) = load_split(cfg)?;
    let top: Vec<u32> = most_popular(&ds).into_iter().take(10).collect();
    let mut m = Metrics::default();
    for s in eval_samples(cfg, &split, split_name)? {
        m.add(&top, s.target);
    }
    Ok(m)
}
