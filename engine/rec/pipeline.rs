//! The recommendation job: a TOML config, training (SFT or ILRec) on a data set's leave-one-out
//! split with semantic-ID item tokens, and full-ranking evaluation by trie-constrained beam
//! search. Everything evaluation needs (adapter, item tokens' rows, semantic IDs) is written to
//! the run's output directory.
use super::beam::{recommend, BeamOptions};
use super::data::{leave_one_out, load_lcrec, load_recbole, load_recbole_presplit, Dataset, Sample, DEFAULT_MAX_HISTORY};
use super::metrics::Metrics;
use super::prompt::PromptBuilder;
use super::semantic_id::{add_item_tokens, assign_semantic_ids, item_embeddings, SemanticIdConfig, SemanticIds, SEMANTIC_IDS_FILE};
use super::trie::ItemTrie;
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
    /// `semantic` (built by the engine) or `lcrec_index` (the data set's index.json).
    pub kind: String,
    pub levels: usize,
    pub codes: usize,
    pub kmeans_iters: usize,
    /// Item text tokens embedded per item.
    pub max_text_tokens: usize,
    pub seed: u64,
}

impl Default for IdsConfig {
    fn default() -> Self {
        IdsConfig { kind: "semantic".into(), levels: 3, codes: 256, kmeans_iters: 50, max_text_tokens: 64, seed: 42 }
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
}

impl Default for IlrecConfig {
    fn default() -> Self {
        let p = IlrecParams::default();
        IlrecConfig { alpha: p.alpha, beta: p.beta, lambda: p.lambda, mu: p.mu, k: 4, layers: vec![], neg_weight: "prob".into(), cpd_direction: "forward".into(), negatives: "intermediate".into() }
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
    pub output_dir: PathBuf,
    /// `sft` or `ilrec`.
    pub method: String,
    pub data: DataConfig,
    pub ids: IdsConfig,
    pub train: TrainConfig,
    pub ilrec: IlrecConfig,
    pub eval: EvalConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            model_dir: "weights/smollm2-135m".into(),
            output_dir: "runs/default".into(),
            method: "ilrec".into(),
            data: DataConfig::default(),
            ids: IdsConfig::default(),
            train: TrainConfig::default(),
            ilrec: IlrecConfig::default(),
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
                if c.mu > 0.0 {
                    return Err(Error::InvalidField {
                        path: "config".into(),
                        field: "ilrec.mu".into(),
                        msg: "CRR needs per-position CF rewards from SASRec, which this version does not build yet; set mu = 0".into(),
                    });
                }
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

/// Model and tokenizer with the item tokens added; the semantic IDs and the first new id.
struct Prepared {
    model: Model,
    tok: TextTokenizer,
    ids: SemanticIds,
}

fn semantic_ids(cfg: &RunConfig, ds: &Dataset, model: &Model, tok: &TextTokenizer, log: &mut dyn FnMut(&str)) -> Result<SemanticIds> {
    match cfg.ids.kind.as_str() {
        "lcrec_index" => {
            let map = ds.semantic_ids.clone().ok_or_else(|| Error::InvalidField {
                path: cfg.data.dir.clone(),
                field: "ids.kind".into(),
                msg: "lcrec_index needs a data set with an index.json".into(),
            })?;
            SemanticIds::from_lcrec_index_disambiguated(map)
        }
        "semantic" => {
            let texts = ds.items.iter().map(|it| tok.encode(&it.text)).collect::<Result<Vec<_>>>()?;
            log(&format!("embedding {} item texts with the model ...", texts.len()));
            let mut last = 0;
            let mut progress = |done: usize, total: usize| {
                if done * 10 / total > last {
                    last = done * 10 / total;
                    eprintln!("  item embeddings: {done}/{total}");
                }
            };
            let emb = item_embeddings(model, &texts, 16, cfg.ids.max_text_tokens, Some(&mut progress))?;
            let sc = SemanticIdConfig { levels: cfg.ids.levels, codes: cfg.ids.codes, iters: cfg.ids.kmeans_iters, seed: cfg.ids.seed, ..Default::default() };
            log(&format!("residual k-means: {} levels x {} codes", sc.levels, sc.codes));
            assign_semantic_ids(&emb, model.config.hidden_size, &sc)
        }
        o => Err(Error::InvalidField { path: "config".into(), field: "ids.kind".into(), msg: format!("`{o}` (semantic | lcrec_index)") }),
    }
}

fn builder(p: &Prepared) -> Result<PromptBuilder> {
    let eos = p.tok.eos_id().or(p.model.config.eos_token_ids.first().copied()).ok_or_else(|| Error::Tokenizer {
        path: PathBuf::from("tokenizer_config.json"),
        msg: "no EOS token".into(),
    })?;
    let idents: Vec<String> = (0..p.ids.num_items()).map(|i| p.ids.id_string(i)).collect();
    PromptBuilder::new(&p.tok, &idents, eos)
}

const TOKEN_ROWS_FILE: &str = "item_token_rows.safetensors";
const ADAPTER_DIR: &str = "adapter";

/// Trains per `cfg`, writing the adapter, the semantic IDs and the item tokens' rows into
/// `cfg.output_dir`; `on_step` sees every optimizer step.
pub fn run_train(cfg: &RunConfig, log: &mut dyn FnMut(&str), on_step: &mut dyn FnMut(&StepReport)) -> Result<()> {
    let mut model = Model::load(&cfg.model_dir)?;
    let mut tok = TextTokenizer::load(&cfg.model_dir)?;
    let ds = load_dataset(&cfg.data)?;
    let split = leave_one_out(&ds, cfg.data.max_history);
    log(&format!("{}: {} users, {} items; {} train / {} valid / {} test samples", ds.name, ds.users.len(), ds.items.len(), split.train.len(), split.valid.len(), split.test.len()));
    let ids = semantic_ids(cfg, &ds, &model, &tok, log)?;
    let first = add_item_tokens(&mut model, &mut tok, &ids, cfg.ids.seed)?;
    let p = Prepared { model, tok, ids };
    let pb = builder(&p)?;
    let train = subsample(&split.train, cfg.data.max_train_samples, cfg.train.seed);
    let data = train.iter().map(|s: &Sample| pb.example(&s.history, s.target)).collect::<Result<Vec<Example>>>()?;
    let new_tokens: Vec<u32> = (first..first + p.ids.num_tokens() as u32).collect();
    let mut model = p.model;
    let objective = cfg.objective(&model, new_tokens.clone())?;
    log(&format!("training {} on {} samples ({} item tokens added, ids {}..{})", cfg.method, data.len(), new_tokens.len(), first, first as usize + new_tokens.len()));
    std::fs::create_dir_all(&cfg.output_dir).map_err(|e| Error::io(&cfg.output_dir, e))?;
    p.ids.save(&cfg.output_dir.join(SEMANTIC_IDS_FILE))?;
    let ckpt = cfg.output_dir.join("checkpoints");
    let mut tr = Trainer::new(&model, cfg.train.clone(), data.len(), new_tokens.clone())?;
    if tr.resume(&mut model, &ckpt)? {
        log(&format!("resumed from {} at step {}", ckpt.display(), tr.step_count()));
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

/// Evaluates the trained run of `cfg` on `split` (`valid` or `test`): full ranking by beam
/// search over every item, Hit@5/10 and NDCG@5/10; `progress(done, total)` per chunk.
pub fn run_eval(cfg: &RunConfig, split_name: &str, progress: &mut dyn FnMut(usize, usize)) -> Result<Metrics> {
    let mut model = Model::load(&cfg.model_dir)?;
    let mut tok = TextTokenizer::load(&cfg.model_dir)?;
    let ds = load_dataset(&cfg.data)?;
    let split = leave_one_out(&ds, cfg.data.max_history);
    let samples = match split_name {
        "valid" => split.valid,
        "test" => split.test,
        o => return Err(Error::Input(format!("split `{o}` (valid | test)"))),
    };
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
    let lora = Lora::load_peft(&cfg.output_dir.join(ADAPTER_DIR), &model)?;
    lora.merge_into(&mut model)?;
    let p = Prepared { model, tok, ids };
    let pb = builder(&p)?;
    let trie = ItemTrie::new(&p.ids.all_token_ids(first))?;
    let samples = subsample(&samples, cfg.data.max_eval_users, cfg.train.seed ^ 0x5EED);
    let opts = BeamOptions { beam: cfg.eval.beam, top_k: cfg.eval.top_k.max(10).min(cfg.eval.beam), ..Default::default() };
    let mut metrics = Metrics::default();
    let chunk = 8;
    for (ci, part) in samples.chunks(chunk).enumerate() {
        let prompts = part.iter().map(|s| pb.prompt(&s.history)).collect::<Result<Vec<_>>>()?;
        let recs = recommend(&p.model, &trie, &prompts, &opts)?;
        for (s, r) in part.iter().zip(&recs) {
            let ranked: Vec<u32> = r.iter().map(|x| x.item).collect();
            metrics.add(&ranked, s.target);
        }
        progress(((ci + 1) * chunk).min(samples.len()), samples.len());
    }
    Ok(metrics)
}
