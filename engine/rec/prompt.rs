//! Prompts of the sequential-recommendation task (ILREC.md section 1, LC-Rec's template) and
//! the training examples built from them.
use crate::error::{Error, Result};
use crate::train::trainer::Example;
use crate::weights::TextTokenizer;
use serde::{Deserialize, Serialize};

/// The instruction before the history.
pub const PREFIX: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nThe user has interacted with items ";
/// Between two history items.
pub const SEPARATOR: &str = ", ";
/// After the history, up to where the response starts.
pub const SUFFIX: &str = " in chronological order. Can you predict the next possible item that the user may expect?\n\n### Response:";

/// The three text pieces of a prompt: `prefix item_1 separator item_2 ... item_n suffix`.
/// The default is LC-Rec's template (ILREC.md section 1); CPU-scale runs may shorten it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromptTemplate {
    pub prefix: String,
    pub separator: String,
    pub suffix: String,
}

impl Default for PromptTemplate {
    fn default() -> Self {
        PromptTemplate { prefix: PREFIX.into(), separator: SEPARATOR.into(), suffix: SUFFIX.into() }
    }
}

/// Tokenised template pieces and every item's identifier tokens.
///
/// In semantic-ID mode the identifiers are added special tokens, which the tokenizer splits out
/// before its pre-tokenizer runs, so splicing pre-tokenised pieces gives exactly the ids of the
/// whole prompt string (tested against encoding the string).
#[derive(Clone, Debug)]
pub struct PromptBuilder {
    prefix: Vec<u32>,
    separator: Vec<u32>,
    suffix: Vec<u32>,
    /// Per item: its identifier tokens (without EOS).
    pub item_tokens: Vec<Vec<u32>>,
    pub eos: u32,
}

impl PromptBuilder {
    /// `identifiers[i]` is item `i`'s identifier text (e.g. `<a_1><b_7><c_3><d_0>`).
    pub fn new(tok: &TextTokenizer, template: &PromptTemplate, identifiers: &[String], eos: u32) -> Result<Self> {
        let item_tokens = identifiers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let ids = tok.encode(s)?;
                if ids.is_empty() {
                    return Err(Error::Input(format!("item {i}: identifier `{s}` encodes to no tokens")));
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        let t = template;
        Ok(PromptBuilder { prefix: tok.encode(&t.prefix)?, separator: tok.encode(&t.separator)?, suffix: tok.encode(&t.suffix)?, item_tokens, eos })
    }

    /// Token ids of the prompt for `history` (item indices, oldest first).
    pub fn prompt(&self, history: &[u32]) -> Result<Vec<u32>> {
        let mut out = self.prefix.clone();
        for (j, &item) in history.iter().enumerate() {
            let ids = self.item_tokens.get(item as usize).ok_or_else(|| Error::Input(format!("history item {item} is not a known item ({} items)", self.item_tokens.len())))?;
            if j > 0 {
                out.extend_from_slice(&self.separator);
            }
            out.extend_from_slice(ids);
        }
        out.extend_from_slice(&self.suffix);
        Ok(out)
    }

    /// A training example: the prompt, then the target's identifier and EOS, with the loss on
    /// those response tokens; identifier tokens are item rows (ILREC.md section 2), EOS is not.
    pub fn example(&self, history: &[u32], target: u32) -> Result<Example> {
        let prompt = self.prompt(history)?;
        let ids = self.item_tokens.get(target as usize).ok_or_else(|| Error::Input(format!("target item {target} is not a known item ({} items)", self.item_tokens.len())))?;
        let mut response = ids.clone();
        response.push(self.eos);
        let mut ex = Example::prompt_response(&prompt, &response);
        for (flag, _) in ex.item_mask.iter_mut().zip(ids) {
            *flag = true;
        }
        Ok(ex)
    }
}
