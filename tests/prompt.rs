//! Prompt building: spliced token ids equal the tokenizer's ids of the whole prompt string.
mod common;
use common::{repo, skip};
use ilrec::rec::prompt::{PromptBuilder, PromptTemplate, PREFIX, SEPARATOR, SUFFIX};
use ilrec::weights::TextTokenizer;

#[test]
fn spliced_prompt_equals_encoding_the_whole_string() {
    let dir = repo().join("weights/smollm2-135m");
    if !dir.join("tokenizer.json").exists() {
        return skip("spliced_prompt_equals_encoding_the_whole_string", "weights/smollm2-135m absent (run scripts/fetch-smollm2.sh)");
    }
    let mut tok = TextTokenizer::load(&dir).unwrap();
    let codes: Vec<String> = ["a", "b", "c"].iter().flat_map(|l| (0..4).map(move |i| format!("<{l}_{i}>"))).collect();
    tok.add_tokens(&codes).unwrap();
    let identifiers: Vec<String> = (0..6).map(|i| format!("<a_{}><b_{}><c_{}>", i % 4, (i * 3) % 4, (i + 1) % 4)).collect();
    let eos = tok.eos_id().unwrap();
    let compact = PromptTemplate { prefix: "Items:".into(), separator: "".into(), suffix: "\nNext:".into() };
    assert_eq!(PromptTemplate::default(), PromptTemplate { prefix: PREFIX.into(), separator: SEPARATOR.into(), suffix: SUFFIX.into() });
    for template in [PromptTemplate::default(), compact] {
    let pb = PromptBuilder::new(&tok, &template, &identifiers, eos).unwrap();
    for history in [vec![0u32], vec![3, 1, 5, 2], vec![4, 4, 0]] {
        let body = history.iter().map(|&i| identifiers[i as usize].as_str()).collect::<Vec<_>>().join(&template.separator);
        let text = format!("{}{body}{}", template.prefix, template.suffix);
        assert_eq!(pb.prompt(&history).unwrap(), tok.encode(&text).unwrap(), "history {history:?}");
        let ex = pb.example(&history, 2).unwrap();
        let resp = &ex.tokens[ex.tokens.len() - 4..];
        assert_eq!(&resp[..3], pb.item_tokens[2].as_slice());
        assert_eq!(resp[3], eos);
        assert_eq!(ex.targets, resp.to_vec());
        assert_eq!(ex.item_mask, vec![true, true, true, false]);
        // Position p predicts token p + 1.
        for (&p, &t) in ex.loss_positions.iter().zip(&ex.targets) {
            assert_eq!(ex.tokens[p + 1], t);
        }
    }
    assert!(pb.prompt(&[9]).is_err(), "unknown history item");
    }
}
