//! Sequential-recommendation data sets and the paper's leave-one-out split (ILREC.md section 1,
//! docs/data.md).
//!
//! Three loaders produce one [`Dataset`]: per-user item sequences in time order plus item text
//! (and, for LC-Rec data, the semantic IDs of `index.json`):
//! - [`load_recbole`]: RecBole atomic files `{name}.inter` (+ optional `{name}.item`), e.g.
//!   MovieLens-100K from `scripts/fetch-ml100k.sh`.
//! - [`load_recbole_presplit`]: RecBole's pre-split files `{name}.{train,valid,test}.inter` +
//!   `{name}.text` (UniSRec data such as Amazon Scientific); the full sequences are
//!   reconstructed from the rows and checked against them.
//! - [`load_lcrec`]: LC-Rec JSON `{name}.inter.json`, `{name}.item.json`, `{name}.index.json`.
//!
//! [`leave_one_out`] turns a [`Dataset`] into training, validation and test samples. Users with
//! fewer than [`MIN_INTERACTIONS`] interactions are kept by the loaders and dropped by the split.
//!
//! Dense ids: users and items are numbered in the *natural order* of their raw ids: numeric
//! order when every raw id of the kind is an unsigned integer (ties by string), string order
//! otherwise. Only items that occur in the interaction data get an id.
//!
//! Errors name the file, the 1-based line and the field or id at fault; the loaders never panic
//! on bad input. Line-oriented files are read as a stream.
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// The paper's history cap: a sample's history holds at most this many (most recent) items.
pub const DEFAULT_MAX_HISTORY: usize = 20;
/// Users with fewer interactions than this are dropped by [`leave_one_out`].
pub const MIN_INTERACTIONS: usize = 3;

/// One item of a data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The item's id in the source files (for UniSRec data with `.item2index`, the original id,
    /// e.g. the Amazon ASIN).
    pub raw_id: String,
    /// The item's title (the raw id when the item file lacks the item; see `Dataset::warnings`).
    pub title: String,
    /// The title followed by the item's other text fields, joined with ". " (for embeddings).
    pub text: String,
}

/// A loaded data set: users, items and each user's interactions in time order.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The data set's name (the file stem passed to the loader).
    pub name: String,
    /// Items; the index is the dense item id `0..items.len()`.
    pub items: Vec<Item>,
    /// Raw user ids; the index is the dense user id.
    pub users: Vec<String>,
    /// Per user (same index as `users`), dense item ids in time order. Users with fewer than
    /// [`MIN_INTERACTIONS`] interactions are kept here; [`leave_one_out`] drops them.
    pub sequences: Vec<Vec<u32>>,
    /// LC-Rec semantic IDs per item (same index as `items`), e.g. `["<a_12>","<b_3>",...]`;
    /// `None` when the data set has no `index.json`.
    pub semantic_ids: Option<Vec<Vec<String>>>,
    /// Non-fatal findings, each a single counted message naming the file (items absent from the
    /// item file, an absent item file, semantic IDs shared by several items).
    pub warnings: Vec<String>,
}

impl Dataset {
    /// The total number of interactions (sum of the sequence lengths).
    pub fn num_interactions(&self) -> usize {
        self.sequences.iter().map(Vec::len).sum()
    }

    /// Maps raw item ids to dense ids.
    pub fn item_index(&self) -> HashMap<&str, u32> {
        self.items
            .iter()
            .enumerate()
            .map(|(i, it)| (it.raw_id.as_str(), i as u32))
            .collect()
    }
}

/// One training or evaluation sample: the `history` (at most `max_history` most recent items,
/// oldest first) precedes `target` in `user`'s sequence.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Sample {
    /// Dense user id.
    pub user: u32,
    /// Dense item ids, oldest first.
    pub history: Vec<u32>,
    /// Dense item id of the next item.
    pub target: u32,
}

/// A leave-one-out split.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    /// For each kept user with items `i_1..i_n`: `(i_1..i_{k-1}) -> i_k` for `k = 2..=n-2`, users
    /// in dense order, `k` ascending.
    pub train: Vec<Sample>,
    /// `(i_1..i_{n-2}) -> i_{n-1}`, one per kept user.
    pub valid: Vec<Sample>,
    /// `(i_1..i_{n-1}) -> i_n`, one per kept user.
    pub test: Vec<Sample>,
    /// How many users had fewer than [`MIN_INTERACTIONS`] interactions and were dropped.
    pub dropped_users: usize,
}

/// The paper's leave-one-out split (ILREC.md section 1): per user, the last item is the test
/// target, the second-to-last the validation target, and every earlier prefix a training
/// sample; histories keep the `max_history` most recent items (pass [`DEFAULT_MAX_HISTORY`];
/// `usize::MAX` for no cap). Users with fewer than [`MIN_INTERACTIONS`] interactions are dropped
/// here (counted in `Split::dropped_users`), not by the loaders.
pub fn leave_one_out(ds: &Dataset, max_history: usize) -> Split {
    let mut split = Split::default();
    let sample = |user: usize, seq: &[u32], k: usize| {
        // target = seq[k] (0-based), history = the up to `max_history` items before it.
        let start = k.saturating_sub(max_history);
        Sample {
            user: user as u32,
            history: seq[start..k].to_vec(),
            target: seq[k],
        }
    };
    for (user, seq) in ds.sequences.iter().enumerate() {
        let n = seq.len();
        if n < MIN_INTERACTIONS {
            split.dropped_users += 1;
            continue;
        }
        for k in 1..n - 2 {
            split.train.push(sample(user, seq, k));
        }
        split.valid.push(sample(user, seq, n - 2));
        split.test.push(sample(user, seq, n - 1));
    }
    split
}

// ---------------------------------------------------------------------------------------------
// Line-oriented reading

const RECBOLE: &str = "RecBole atomic file";
const LCREC: &str = "LC-Rec JSON";

/// Streams a text file line by line with 1-based line numbers; strips `\n`, `\r\n` and a
/// leading UTF-8 BOM, and rejects invalid UTF-8 with the line number.
struct Lines {
    path: PathBuf,
    reader: BufReader<File>,
    buf: Vec<u8>,
    line_no: usize,
}

impl Lines {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(Lines {
            path: path.to_path_buf(),
            reader: BufReader::with_capacity(1 << 16, file),
            buf: Vec::new(),
            line_no: 0,
        })
    }

    fn next_line(&mut self) -> Result<Option<(usize, &str)>> {
        self.buf.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| Error::io(&self.path, e))?;
        if n == 0 {
            return Ok(None);
        }
        self.line_no += 1;
        let mut bytes: &[u8] = &self.buf;
        if let Some(b) = bytes.strip_suffix(b"\n") {
            bytes = b;
        }
        if let Some(b) = bytes.strip_suffix(b"\r") {
            bytes = b;
        }
        if self.line_no == 1 {
            if let Some(b) = bytes.strip_prefix(b"\xEF\xBB\xBF") {
                bytes = b;
            }
        }
        let line = std::str::from_utf8(bytes).map_err(|e| {
            Error::format(
                &self.path,
                RECBOLE,
                format!("line {}: not valid UTF-8 ({e})", self.line_no),
            )
        })?;
        Ok(Some((self.line_no, line)))
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// A RecBole typed header `name:type<TAB>...`.
struct Header {
    names: Vec<String>,
    types: Vec<String>,
}

impl Header {
    /// Reads line 1 of a RecBole atomic file; an empty file is an error.
    fn read(lines: &mut Lines) -> Result<Header> {
        let path = lines.path.clone();
        let Some((no, line)) = lines.next_line()? else {
            return Err(Error::format(
                &path,
                RECBOLE,
                "empty file: expected a header line such as `user_id:token\titem_id:token`",
            ));
        };
        if line.trim().is_empty() {
            return Err(Error::format(
                &path,
                RECBOLE,
                format!("line {no}: empty header line"),
            ));
        }
        let mut names = Vec::new();
        let mut types = Vec::new();
        for (col, field) in line.split('\t').enumerate() {
            let Some((name, ty)) = field.split_once(':') else {
                return Err(Error::format(
                    &path,
                    RECBOLE,
                    format!(
                        "line {no}: header field {} `{field}` has no `:type` (expected e.g. `item_id:token`)",
                        col + 1
                    ),
                ));
            };
            let name = name.trim();
            if names.iter().any(|n| n == name) {
                return Err(Error::format(
                    &path,
                    RECBOLE,
                    format!("line {no}: header field `{name}` appears twice"),
                ));
            }
            names.push(name.to_string());
            types.push(ty.trim().to_string());
        }
        Ok(Header { names, types })
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    fn require(&self, path: &Path, name: &str) -> Result<usize> {
        self.find(name).ok_or_else(|| {
            Error::format(
                path,
                RECBOLE,
                format!(
                    "line 1: missing header field `{name}` (header has {})",
                    self.names.join(", ")
                ),
            )
        })
    }

    /// Splits a data row into exactly `names.len()` fields.
    fn split<'a>(&self, path: &Path, no: usize, line: &'a str) -> Result<Vec<&'a str>> {
        let out: Vec<&str> = line.split('\t').collect();
        if out.len() != self.names.len() {
            return Err(Error::format(
                path,
                RECBOLE,
                format!(
                    "line {no}: {} tab-separated fields, the header has {} ({})",
                    out.len(),
                    self.names.len(),
                    self.names.join(", ")
                ),
            ));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Id interning and natural order

/// Assigns temporary ids in order of first appearance.
#[derive(Default)]
struct Interner {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl Interner {
    fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    fn intern(&mut self, s: &str, path: &Path, kind: &str) -> Result<u32> {
        if let Some(&i) = self.ids.get(s) {
            return Ok(i);
        }
        let i = u32::try_from(self.names.len())
            .map_err(|_| Error::format(path, RECBOLE, format!("more than 2^32 {kind} ids")))?;
        self.ids.insert(s.to_string(), i);
        self.names.push(s.to_string());
        Ok(i)
    }

    /// Sorts the names in natural order; returns them and the map temporary id -> dense id.
    fn finish(self) -> (Vec<String>, Vec<u32>) {
        let names = self.names;
        let mut order: Vec<usize> = (0..names.len()).collect();
        let numeric: Option<Vec<u64>> = names.iter().map(|s| s.parse::<u64>().ok()).collect();
        match numeric {
            Some(nums) => order.sort_by(|&a, &b| nums[a].cmp(&nums[b]).then_with(|| names[a].cmp(&names[b]))),
            None => order.sort_by(|&a, &b| names[a].cmp(&names[b])),
        }
        let mut remap = vec![0u32; names.len()];
        for (dense, &tmp) in order.iter().enumerate() {
            remap[tmp] = dense as u32;
        }
        let mut sorted = Vec::with_capacity(names.len());
        let mut names: Vec<Option<String>> = names.into_iter().map(Some).collect();
        for &tmp in &order {
            sorted.push(names[tmp].take().unwrap_or_default());
        }
        (sorted, remap)
    }
}

// ---------------------------------------------------------------------------------------------
// Item text

/// Title and text of an item from its fields.
#[derive(Clone)]
struct ItemText {
    title: String,
    text: String,
}

fn join_text<'a>(fields: impl IntoIterator<Item = &'a str>) -> String {
    let parts: Vec<&str> = fields
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    parts.join(". ")
}

/// Reads a RecBole item-feature file (`.item` or UniSRec `.text`): the `item_id` column, the
/// title (first column whose name contains "title"; otherwise the first text column), and the
/// text (all `token`/`token_seq` columns other than the id, title first). Keeps only the ids
/// `keep` accepts. Duplicate ids and rows of the wrong width are errors; an empty file too.
fn read_item_file(path: &Path, mut keep: impl FnMut(&str) -> bool) -> Result<HashMap<String, ItemText>> {
    let mut lines = Lines::open(path)?;
    let header = Header::read(&mut lines)?;
    let id_col = header.require(path, "item_id")?;
    let text_cols: Vec<usize> = (0..header.names.len())
        .filter(|&c| c != id_col && matches!(header.types[c].as_str(), "token" | "token_seq"))
        .collect();
    let title_col = text_cols
        .iter()
        .copied()
        .find(|&c| header.names[c].to_lowercase().contains("title"))
        .or_else(|| text_cols.first().copied());
    let mut order = Vec::with_capacity(text_cols.len());
    order.extend(title_col);
    order.extend(text_cols.iter().copied().filter(|&c| Some(c) != title_col));

    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = HashMap::new();
    let mut rows = 0usize;
    let file = file_name(path);
    while let Some((no, line)) = lines.next_line()? {
        if line.is_empty() {
            continue;
        }
        let fields = header.split(path, no, line)?;
        rows += 1;
        let id = fields[id_col].trim();
        if id.is_empty() {
            return Err(Error::format(
                path,
                RECBOLE,
                format!("line {no}: field `item_id` is empty"),
            ));
        }
        if let Some(first) = seen.insert(id.to_string(), no) {
            return Err(Error::format(
                path,
                RECBOLE,
                format!("line {no}: item id `{id}` appears twice in {file} (first on line {first})"),
            ));
        }
        if !keep(id) {
            continue;
        }
        let title = title_col
            .map(|c| fields[c].trim().to_string())
            .unwrap_or_default();
        let text = join_text(order.iter().map(|&c| fields[c]));
        out.insert(id.to_string(), ItemText { title, text });
    }
    if rows == 0 {
        return Err(Error::format(
            path,
            RECBOLE,
            "no item rows after the header (empty file)",
        ));
    }
    Ok(out)
}

/// Builds the item list in dense order; items without text get their raw id as title and text,
/// counted in one warning.
fn build_items(
    raw_ids: Vec<String>,
    texts: Option<&HashMap<String, ItemText>>,
    item_file: &Path,
    inter_file: &str,
    warnings: &mut Vec<String>,
) -> Vec<Item> {
    let mut missing = Vec::new();
    let items: Vec<Item> = raw_ids
        .into_iter()
        .map(|raw| match texts.and_then(|t| t.get(&raw)) {
            Some(t) => Item {
                title: t.title.clone(),
                text: t.text.clone(),
                raw_id: raw,
            },
            None => {
                missing.push(raw.clone());
                Item {
                    title: raw.clone(),
                    text: raw.clone(),
                    raw_id: raw,
                }
            }
        })
        .collect();
    if texts.is_none() {
        warnings.push(format!(
            "{}: not found; the title and text of all {} items are their raw ids",
            item_file.display(),
            items.len()
        ));
    } else if !missing.is_empty() {
        let first: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
        warnings.push(format!(
            "{}: {} of the {} items of {inter_file} are absent; their title and text are the raw id (first: {})",
            item_file.display(),
            missing.len(),
            items.len(),
            first.join(", ")
        ));
    }
    items
}

// ---------------------------------------------------------------------------------------------
// RecBole atomic files

/// Loads RecBole atomic files `dir/{name}.inter` and, when present, `dir/{name}.item`.
///
/// `.inter` needs the header fields `user_id` and `item_id`; with a `timestamp` field each
/// user's interactions are sorted by it (stable: ties keep file order), without one they keep
/// file order. Other columns (rating, ...) are ignored; every interaction is kept.
/// Items are the items of `.inter`; `.item` rows of other items are ignored, `.inter` items
/// missing from `.item` (or all items, when there is no `.item`) get their raw id as title and
/// text, reported in one warning in `Dataset::warnings`.
pub fn load_recbole(dir: &Path, name: &str) -> Result<Dataset> {
    let inter_path = dir.join(format!("{name}.inter"));
    let mut lines = Lines::open(&inter_path)?;
    let header = Header::read(&mut lines)?;
    let user_col = header.require(&inter_path, "user_id")?;
    let item_col = header.require(&inter_path, "item_id")?;
    let ts_col = header.find("timestamp");

    let mut users = Interner::default();
    let mut items = Interner::default();
    // Per temporary user: (timestamp, temporary item), in file order.
    let mut per_user: Vec<Vec<(f64, u32)>> = Vec::new();
    let mut rows = 0usize;
    while let Some((no, line)) = lines.next_line()? {
        if line.is_empty() {
            continue;
        }
        let fields = header.split(&inter_path, no, line)?;
        let u = fields[user_col].trim();
        let i = fields[item_col].trim();
        for (field, value) in [("user_id", u), ("item_id", i)] {
            if value.is_empty() {
                return Err(Error::format(
                    &inter_path,
                    RECBOLE,
                    format!("line {no}: field `{field}` is empty"),
                ));
            }
        }
        let ts = match ts_col {
            Some(c) => {
                let s = fields[c].trim();
                match s.parse::<f64>() {
                    Ok(t) if t.is_finite() => t,
                    _ => {
                        return Err(Error::format(
                            &inter_path,
                            RECBOLE,
                            format!("line {no}: field `timestamp`: `{s}` is not a finite number"),
                        ))
                    }
                }
            }
            None => 0.0,
        };
        let u = users.intern(u, &inter_path, "user")? as usize;
        let i = items.intern(i, &inter_path, "item")?;
        if u == per_user.len() {
            per_user.push(Vec::new());
        }
        per_user[u].push((ts, i));
        rows += 1;
    }
    if rows == 0 {
        return Err(Error::format(
            &inter_path,
            RECBOLE,
            "no interactions after the header (empty file)",
        ));
    }

    let (user_names, user_remap) = users.finish();
    let (item_names, item_remap) = items.finish();
    let mut sequences = vec![Vec::new(); user_names.len()];
    for (tmp, mut inter) in per_user.into_iter().enumerate() {
        // `sort_by` is stable: equal timestamps keep file order.
        inter.sort_by(|a, b| a.0.total_cmp(&b.0));
        sequences[user_remap[tmp] as usize] =
            inter.into_iter().map(|(_, i)| item_remap[i as usize]).collect();
    }

    let item_path = dir.join(format!("{name}.item"));
    let texts = if item_path.exists() {
        let needed: HashSet<&str> = item_names.iter().map(String::as_str).collect();
        Some(read_item_file(&item_path, |id| needed.contains(id))?)
    } else {
        None
    };
    let mut warnings = Vec::new();
    let items = build_items(
        item_names,
        texts.as_ref(),
        &item_path,
        &file_name(&inter_path),
        &mut warnings,
    );
    Ok(Dataset {
        name: name.to_string(),
        items,
        users: user_names,
        sequences,
        semantic_ids: None,
        warnings,
    })
}

/// Reads a two-column `raw<TAB>index` map (`.item2index`, `.user2index`; no header) into
/// index -> raw.
fn read_index_map(path: &Path) -> Result<HashMap<String, String>> {
    let mut lines = Lines::open(path)?;
    let mut map = HashMap::new();
    let mut rows = 0usize;
    while let Some((no, line)) = lines.next_line()? {
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split('\t');
        let (Some(raw), Some(idx), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::format(
                path,
                RECBOLE,
                format!("line {no}: expected 2 tab-separated fields `raw_id<TAB>index`"),
            ));
        };
        let (raw, idx) = (raw.trim(), idx.trim());
        if raw.is_empty() || idx.is_empty() {
            return Err(Error::format(path, RECBOLE, format!("line {no}: empty field")));
        }
        if map.insert(idx.to_string(), raw.to_string()).is_some() {
            return Err(Error::format(
                path,
                RECBOLE,
                format!("line {no}: index `{idx}` appears twice"),
            ));
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(Error::format(path, RECBOLE, "empty file"));
    }
    Ok(map)
}

/// One row of a pre-split file.
struct Row {
    file: usize,
    line: usize,
    history: Vec<u32>,
    target: u32,
}

/// Loads RecBole pre-split files (UniSRec layout): `dir/{name}.train.inter`, `.valid.inter`,
/// `.test.inter` with header fields `user_id`, `item_id_list` (space-separated history) and
/// `item_id`, plus `dir/{name}.text` (`item_id`, text columns). When `dir/{name}.item2index` /
/// `.user2index` exist (`raw_id<TAB>index`), the ids in the `.inter` files are those indices and
/// `Item::raw_id` / `Dataset::users` hold the raw ids; `.text` is keyed by raw item id.
///
/// Each user's full sequence is rebuilt by chaining the rows: starting from the row with the
/// shortest history, the next row is the one whose history equals the last `min(len, cap)`
/// items built so far (`cap` = the longest history in the files, so truncated histories are
/// followed too), and its target is appended. The rebuild must use every row of the user and
/// end with the validation row then the test row; otherwise it is an error naming a row. So
/// [`leave_one_out`] with `max_history = cap` reproduces the files' split exactly.
/// Every item of the `.inter` files must be in `.text` (and `.item2index`), or it is an error
/// naming the file, line and id.
pub fn load_recbole_presplit(dir: &Path, name: &str) -> Result<Dataset> {
    let item2index = dir.join(format!("{name}.item2index"));
    let user2index = dir.join(format!("{name}.user2index"));
    let text_path = dir.join(format!("{name}.text"));
    let item_map = if item2index.exists() {
        Some(read_index_map(&item2index)?)
    } else {
        None
    };
    let user_map = if user2index.exists() {
        Some(read_index_map(&user2index)?)
    } else {
        None
    };
    let texts = read_item_file(&text_path, |_| true)?;
    let text_file = file_name(&text_path);

    let paths: Vec<PathBuf> = ["train", "valid", "test"]
        .iter()
        .map(|s| dir.join(format!("{name}.{s}.inter")))
        .collect();
    let mut users = Interner::default();
    let mut items = Interner::default();
    let mut rows: Vec<Vec<Row>> = Vec::new();
    let mut cap = 0usize;
    for (f, path) in paths.iter().enumerate() {
        let mut lines = Lines::open(path)?;
        let header = Header::read(&mut lines)?;
        let user_col = header.require(path, "user_id")?;
        let list_col = header.require(path, "item_id_list")?;
        let item_col = header.require(path, "item_id")?;
        let mut count = 0usize;
        while let Some((no, line)) = lines.next_line()? {
            if line.is_empty() {
                continue;
            }
            let fields = header.split(path, no, line)?;
            let u = fields[user_col].trim();
            if u.is_empty() {
                return Err(Error::format(
                    path,
                    RECBOLE,
                    format!("line {no}: field `user_id` is empty"),
                ));
            }
            if let Some(m) = &user_map {
                if !m.contains_key(u) {
                    return Err(Error::format(
                        path,
                        RECBOLE,
                        format!("line {no}: user id `{u}` is not in {}", file_name(&user2index)),
                    ));
                }
            }
            let mut intern_item = |id: &str, field: &str| -> Result<u32> {
                if id.is_empty() {
                    return Err(Error::format(
                        path,
                        RECBOLE,
                        format!("line {no}: field `{field}` is empty"),
                    ));
                }
                if let Some(i) = items.get(id) {
                    return Ok(i);
                }
                let raw = match &item_map {
                    Some(m) => m.get(id).ok_or_else(|| {
                        Error::format(
                            path,
                            RECBOLE,
                            format!(
                                "line {no}: field `{field}`: item id `{id}` is not in {}",
                                file_name(&item2index)
                            ),
                        )
                    })?,
                    None => id,
                };
                if !texts.contains_key(raw) {
                    return Err(Error::format(
                        path,
                        RECBOLE,
                        format!("line {no}: field `{field}`: item id `{raw}` is not in {text_file}"),
                    ));
                }
                items.intern(id, path, "item")
            };
            let mut history = Vec::new();
            for tok in fields[list_col].split(' ').filter(|t| !t.is_empty()) {
                history.push(intern_item(tok, "item_id_list")?);
            }
            let target = intern_item(fields[item_col].trim(), "item_id")?;
            cap = cap.max(history.len());
            let u = users.intern(u, path, "user")? as usize;
            if u == rows.len() {
                rows.push(Vec::new());
            }
            rows[u].push(Row {
                file: f,
                line: no,
                history,
                target,
            });
            count += 1;
        }
        // The train file may be empty (every user has 3 items); valid and test may not.
        if count == 0 && f > 0 {
            return Err(Error::format(
                path,
                RECBOLE,
                "no rows after the header (empty file)",
            ));
        }
    }

    let mut sequences_tmp = Vec::with_capacity(rows.len());
    for (u, user_rows) in rows.into_iter().enumerate() {
        let user = &users.names[u];
        sequences_tmp.push(rebuild_sequence(user, user_rows, cap, &paths)?);
    }

    let (user_tokens, user_remap) = users.finish();
    let (item_tokens, item_remap) = items.finish();
    let mut sequences = vec![Vec::new(); user_tokens.len()];
    for (tmp, seq) in sequences_tmp.into_iter().enumerate() {
        sequences[user_remap[tmp] as usize] = seq.into_iter().map(|i| item_remap[i as usize]).collect();
    }
    let raw = |map: &Option<HashMap<String, String>>, tok: String| match map {
        Some(m) => m.get(&tok).cloned().unwrap_or(tok),
        None => tok,
    };
    let user_names: Vec<String> = user_tokens.into_iter().map(|t| raw(&user_map, t)).collect();
    let item_names: Vec<String> = item_tokens.into_iter().map(|t| raw(&item_map, t)).collect();
    let mut warnings = Vec::new();
    let items = build_items(
        item_names,
        Some(&texts),
        &text_path,
        &file_name(&paths[0]),
        &mut warnings,
    );
    Ok(Dataset {
        name: name.to_string(),
        items,
        users: user_names,
        sequences,
        semantic_ids: None,
        warnings,
    })
}

/// Chains one user's pre-split rows into the full sequence (see [`load_recbole_presplit`]).
fn rebuild_sequence(user: &str, rows: Vec<Row>, cap: usize, paths: &[PathBuf]) -> Result<Vec<u32>> {
    let (valid, test) = (1usize, 2usize);
    for f in [valid, test] {
        let n = rows.iter().filter(|r| r.file == f).count();
        if n != 1 {
            let r = &rows[0];
            let msg = if n == 0 {
                format!(
                    "user `{user}` (line {}) has no row in {}",
                    r.line,
                    file_name(&paths[f])
                )
            } else {
                let second = rows.iter().filter(|r| r.file == f).nth(1).map_or(0, |r| r.line);
                format!("line {second}: user `{user}` has {n} rows; expected one")
            };
            let at = if n == 0 { &paths[r.file] } else { &paths[f] };
            return Err(Error::format(at, RECBOLE, msg));
        }
    }
    // Start: the row with the shortest history (train rows first on ties).
    let start = (0..rows.len())
        .min_by_key(|&i| (rows[i].history.len(), rows[i].file))
        .unwrap_or(0);
    let mut seq: Vec<u32> = rows[start].history.clone();
    seq.push(rows[start].target);
    let mut order = vec![start];
    // Remaining rows by history; each list in priority order train, valid, test (file order).
    let mut by_history: HashMap<&[u32], Vec<usize>> = HashMap::new();
    let mut idx: Vec<usize> = (0..rows.len()).filter(|&i| i != start).collect();
    idx.sort_by_key(|&i| (rows[i].file, rows[i].line));
    for &i in idx.iter().rev() {
        by_history.entry(rows[i].history.as_slice()).or_default().push(i);
    }
    for _ in 1..rows.len() {
        let key = &seq[seq.len() - seq.len().min(cap)..];
        let next = by_history.get_mut(key).and_then(Vec::pop);
        let Some(i) = next else {
            let stuck = idx
                .iter()
                .find(|&&i| !order.contains(&i))
                .copied()
                .unwrap_or(start);
            let r = &rows[stuck];
            return Err(Error::format(
                &paths[r.file],
                RECBOLE,
                format!(
                    "line {}: cannot rebuild user `{user}`'s sequence: after {} items no row's `item_id_list` continues it (rows are not the prefixes of one sequence)",
                    r.line,
                    seq.len()
                ),
            ));
        };
        seq.push(rows[i].target);
        order.push(i);
    }
    let n = order.len();
    if n < 2 || rows[order[n - 1]].file != test || rows[order[n - 2]].file != valid {
        let r = &rows[order[n - 1]];
        return Err(Error::format(
            &paths[r.file],
            RECBOLE,
            format!(
                "line {}: user `{user}`'s rebuilt sequence does not end with the validation row then the test row",
                r.line
            ),
        ));
    }
    Ok(seq)
}

// ---------------------------------------------------------------------------------------------
// LC-Rec JSON

/// 1-based line of the first `"key":` in `text` (for error messages).
fn json_key_line(text: &str, key: &str) -> Option<usize> {
    let needle = serde_json::to_string(key).ok()?;
    let mut from = 0;
    while let Some(pos) = text[from..].find(&needle) {
        let at = from + pos;
        let after = text[at + needle.len()..].trim_start();
        if after.starts_with(':') {
            return Some(text[..at].bytes().filter(|&b| b == b'\n').count() + 1);
        }
        from = at + needle.len();
    }
    None
}

fn at_line(text: &str, key: &str) -> String {
    json_key_line(text, key).map_or_else(String::new, |l| format!("line {l}: "))
}

/// Reads a JSON object file. Empty files and syntax errors name the file (and line/column).
fn read_json_object(path: &Path) -> Result<(String, Map<String, Value>)> {
    let mut text = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|e| Error::io(path, e))?;
    if text.trim().is_empty() {
        return Err(Error::format(path, LCREC, "empty file"));
    }
    let value: Value = serde_json::from_str(&text).map_err(|e| Error::format(path, LCREC, e.to_string()))?;
    match value {
        Value::Object(map) if !map.is_empty() => Ok((text, map)),
        Value::Object(_) => Err(Error::format(path, LCREC, "empty object (no entries)")),
        other => Err(Error::format(
            path,
            LCREC,
            format!("top level is {}, expected an object", json_kind(&other)),
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON scalar id (string or integer) as a string.
fn json_id(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        _ => None,
    }
}

/// A JSON item field as text (strings, numbers, arrays of those joined with ", ").
fn json_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Array(a) => a
            .iter()
            .map(json_text)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(", "),
        Value::Null | Value::Object(_) => String::new(),
    }
}

/// Loads LC-Rec JSON: `dir/{name}.inter.json` `{user: [item, ...]}` (time order; ids strings or
/// integers), `dir/{name}.item.json` `{item: {title, description, ...}}` and, when present,
/// `dir/{name}.index.json` `{item: ["<a_12>", ...]}`.
///
/// Items are the items of `inter.json`. Title = the `title` field (required, a string); text =
/// title, then the other fields in key order, non-empty ones joined with ". ". Items missing
/// from `item.json` get their raw id as title and text (one counted warning), as in
/// [`load_recbole`]; `item.json` entries of other items are ignored. With `index.json`, every
/// item must have a non-empty list of string tokens, and an `index.json` key that is in neither
/// `inter.json` nor `item.json` is an unknown item id: both are errors naming file, line and id.
/// Items sharing one semantic ID are reported in one warning.
pub fn load_lcrec(dir: &Path, name: &str) -> Result<Dataset> {
    let inter_path = dir.join(format!("{name}.inter.json"));
    let item_path = dir.join(format!("{name}.item.json"));
    let index_path = dir.join(format!("{name}.index.json"));

    let (inter_text, inter) = read_json_object(&inter_path)?;
    let mut users = Interner::default();
    let mut items = Interner::default();
    let mut per_user: Vec<Vec<u32>> = Vec::new();
    for (user, list) in &inter {
        let Value::Array(list) = list else {
            return Err(Error::format(
                &inter_path,
                LCREC,
                format!(
                    "{}user `{user}`: value is {}, expected an array of item ids",
                    at_line(&inter_text, user),
                    json_kind(list)
                ),
            ));
        };
        let mut seq = Vec::with_capacity(list.len());
        for (pos, v) in list.iter().enumerate() {
            let Some(id) = json_id(v) else {
                return Err(Error::format(
                    &inter_path,
                    LCREC,
                    format!(
                        "{}user `{user}`: entry {} is {}, expected an item id (string or integer)",
                        at_line(&inter_text, user),
                        pos + 1,
                        json_kind(v)
                    ),
                ));
            };
            seq.push(items.intern(&id, &inter_path, "item")?);
        }
        users.intern(user, &inter_path, "user")?;
        per_user.push(seq);
    }
    if items.names.is_empty() {
        return Err(Error::format(
            &inter_path,
            LCREC,
            "no interactions (every user's list is empty)",
        ));
    }

    let (item_text, item_json) = read_json_object(&item_path)?;
    let mut texts = HashMap::new();
    for (id, v) in &item_json {
        if items.get(id).is_none() {
            continue;
        }
        let Value::Object(fields) = v else {
            return Err(Error::format(
                &item_path,
                LCREC,
                format!(
                    "{}item `{id}`: value is {}, expected an object",
                    at_line(&item_text, id),
                    json_kind(v)
                ),
            ));
        };
        let Some(Value::String(title)) = fields.get("title") else {
            return Err(Error::format(
                &item_path,
                LCREC,
                format!(
                    "{}item `{id}`: missing string field `title`",
                    at_line(&item_text, id)
                ),
            ));
        };
        let mut keys: Vec<&String> = fields.keys().filter(|k| *k != "title").collect();
        keys.sort();
        let others: Vec<String> = keys.iter().map(|k| json_text(&fields[k.as_str()])).collect();
        let text = join_text(std::iter::once(title.as_str()).chain(others.iter().map(String::as_str)));
        texts.insert(
            id.clone(),
            ItemText {
                title: title.trim().to_string(),
                text,
            },
        );
    }

    let (user_names, user_remap) = users.finish();
    let (item_names, item_remap) = items.finish();
    let mut sequences = vec![Vec::new(); user_names.len()];
    for (tmp, seq) in per_user.into_iter().enumerate() {
        sequences[user_remap[tmp] as usize] = seq.into_iter().map(|i| item_remap[i as usize]).collect();
    }
    let mut warnings = Vec::new();
    let semantic_ids = if index_path.exists() {
        let (index_text, index) = read_json_object(&index_path)?;
        let dense: HashMap<&str, usize> = item_names
            .iter()
            .enumerate()
            .map(|(i, s)| (s.as_str(), i))
            .collect();
        let mut codes: Vec<Option<Vec<String>>> = vec![None; item_names.len()];
        for (id, v) in &index {
            let Some(&d) = dense.get(id.as_str()) else {
                if item_json.contains_key(id) {
                    continue; // a known item nobody interacted with
                }
                return Err(Error::format(
                    &index_path,
                    LCREC,
                    format!(
                        "{}unknown item id `{id}` (in neither {} nor {})",
                        at_line(&index_text, id),
                        file_name(&inter_path),
                        file_name(&item_path)
                    ),
                ));
            };
            let tokens: Option<Vec<String>> = match v {
                Value::Array(a) if !a.is_empty() => a
                    .iter()
                    .map(|t| match t {
                        Value::String(s) if !s.is_empty() => Some(s.clone()),
                        _ => None,
                    })
                    .collect(),
                _ => None,
            };
            let Some(tokens) = tokens else {
                return Err(Error::format(
                    &index_path,
                    LCREC,
                    format!(
                        "{}item `{id}`: expected a non-empty array of token strings, got {v}",
                        at_line(&index_text, id)
                    ),
                ));
            };
            codes[d] = Some(tokens);
        }
        let mut out = Vec::with_capacity(codes.len());
        for (d, c) in codes.into_iter().enumerate() {
            match c {
                Some(c) => out.push(c),
                None => {
                    let id = &item_names[d];
                    return Err(Error::format(
                        &index_path,
                        LCREC,
                        format!("item `{id}` of {} has no semantic ID", file_name(&inter_path)),
                    ));
                }
            }
        }
        let mut by_code: HashMap<&[String], Vec<usize>> = HashMap::new();
        for (d, c) in out.iter().enumerate() {
            by_code.entry(c.as_slice()).or_default().push(d);
        }
        let mut shared: Vec<&Vec<usize>> = by_code.values().filter(|v| v.len() > 1).collect();
        if !shared.is_empty() {
            shared.sort();
            let n_items: usize = shared.iter().map(|v| v.len()).sum();
            let ex = shared[0];
            warnings.push(format!(
                "{}: {} semantic IDs are shared by more than one item ({} items in all, {} distinct IDs for {} items); e.g. {} for items {}",
                index_path.display(),
                shared.len(),
                n_items,
                by_code.len(),
                out.len(),
                out[ex[0]].concat(),
                ex.iter().map(|&d| item_names[d].as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        Some(out)
    } else {
        None
    };
    let items = build_items(
        item_names,
        Some(&texts),
        &item_path,
        &file_name(&inter_path),
        &mut warnings,
    );
    Ok(Dataset {
        name: name.to_string(),
        items,
        users: user_names,
        sequences,
        semantic_ids,
        warnings,
    })
}
