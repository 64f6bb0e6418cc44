//! A prefix trie over the token sequences of all items (ILREC.md section 1, "Decoding").
//!
//! Nodes are numbered in DFS preorder with children visited by increasing token, so the items
//! under any node form a contiguous run of [`ItemTrie::items_in_order`] (the items sorted by
//! their sequences). Storage is flat: children in CSR form, one entry per node for the parent,
//! the incoming token, the depth, the item (leaves) and the item range.
use crate::error::{Error, Result};
use std::ops::Range;

/// Marks "no item" in the per-node item array.
const NO_ITEM: u32 = u32::MAX;

/// A prefix-free set of item token sequences. Item `i` is `items[i]` of [`ItemTrie::new`]; every
/// item ends at a leaf and every leaf is an item.
#[derive(Clone, Debug)]
pub struct ItemTrie {
    /// CSR offsets into `edges`: node `n`'s children are `edges[child_start[n]..child_start[n + 1]]`.
    child_start: Vec<u32>,
    /// `(token, child node)`, sorted by token within each node.
    edges: Vec<(u32, u32)>,
    parent: Vec<u32>,
    /// Token on the edge into the node (unused for the root).
    token: Vec<u32>,
    depth: Vec<u32>,
    /// Item at a leaf, `NO_ITEM` elsewhere.
    item: Vec<u32>,
    /// `order[range_start[n]..range_end[n]]` are the items under node `n`.
    range_start: Vec<u32>,
    range_end: Vec<u32>,
    /// Items sorted by their sequences (DFS order of the leaves).
    order: Vec<u32>,
    /// Leaf node of each item.
    leaf: Vec<u32>,
    max_len: usize,
    max_token: u32,
}

impl ItemTrie {
    /// Builds the trie. Rejects (with [`Error::Input`] naming the item indices) an empty item
    /// set, empty sequences, duplicate sequences and sequences that are a prefix of another
    /// (end titles with a terminator such as EOS to make them prefix-free).
    pub fn new(items: &[Vec<u32>]) -> Result<ItemTrie> {
        if items.is_empty() {
            return Err(Error::Input("item trie: no items".into()));
        }
        if items.len() >= NO_ITEM as usize {
            return Err(Error::Input(format!("item trie: {} items exceed the u32 index space", items.len())));
        }
        if let Some(i) = items.iter().position(Vec::is_empty) {
            return Err(Error::Input(format!("item trie: item {i} has an empty token sequence")));
        }
        let mut sorted: Vec<u32> = (0..items.len() as u32).collect();
        sorted.sort_unstable_by(|&a, &b| items[a as usize].cmp(&items[b as usize]).then(a.cmp(&b)));
        // In lexicographic order a sequence that prefixes another also prefixes its successor.
        for w in sorted.windows(2) {
            let (a, b) = (&items[w[0] as usize], &items[w[1] as usize]);
            if a == b {
                return Err(Error::Input(format!("item trie: items {} and {} have the same token sequence {a:?}", w[0], w[1])));
            }
            if b.starts_with(a) {
                return Err(Error::Input(format!(
                    "item trie: item {}'s sequence {a:?} is a prefix of item {}'s {b:?} (end sequences with a terminator token)",
                    w[0], w[1]
                )));
            }
        }

        // Insert in sorted order: each sequence shares its longest common prefix with the
        // previous one and opens new nodes for the rest, so nodes come out in DFS preorder
        // and each node's children in increasing token order.
        let max_len = items.iter().map(Vec::len).max().unwrap_or(0);
        let mut kids: Vec<Vec<(u32, u32)>> = vec![Vec::new()];
        let mut parent = vec![0u32];
        let mut token = vec![0u32];
        let mut depth = vec![0u32];
        let mut item = vec![NO_ITEM];
        let mut range_start = vec![0u32];
        let mut range_end = vec![items.len() as u32];
        let mut leaf = vec![0u32; items.len()];
        let mut path: Vec<u32> = vec![0]; // nodes of the previous sequence, root first
        let mut prev: &[u32] = &[];
        for (rank, &it) in sorted.iter().enumerate() {
            let seq = &items[it as usize][..];
            let lcp = prev.iter().zip(seq).take_while(|(a, b)| a == b).count();
            // Close the nodes of the previous sequence below the common prefix.
            for &n in &path[lcp + 1..] {
                range_end[n as usize] = rank as u32;
            }
            path.truncate(lcp + 1);
            for (d, &tok) in seq.iter().enumerate().skip(lcp) {
                let id = kids.len() as u32;
                let up = path[d];
                kids[up as usize].push((tok, id));
                kids.push(Vec::new());
                parent.push(up);
                token.push(tok);
                depth.push(d as u32 + 1);
                item.push(NO_ITEM);
                range_start.push(rank as u32);
                range_end.push(rank as u32 + 1);
                path.push(id);
            }
            let l = *path.last().expect("non-empty sequence");
            item[l as usize] = it;
            leaf[it as usize] = l;
            prev = seq;
        }
        for &n in &path[1..] {
            range_end[n as usize] = items.len() as u32;
        }
        if kids.len() >= u32::MAX as usize {
            return Err(Error::Input(format!("item trie: {} nodes exceed the u32 index space", kids.len())));
        }

        let mut child_start = Vec::with_capacity(kids.len() + 1);
        let mut edges = Vec::with_capacity(kids.len() - 1);
        child_start.push(0u32);
        for k in &kids {
            edges.extend_from_slice(k);
            child_start.push(edges.len() as u32);
        }
        let max_token = items.iter().flatten().copied().max().unwrap_or(0);
        Ok(ItemTrie { child_start, edges, parent, token, depth, item, range_start, range_end, order: sorted, leaf, max_len, max_token })
    }

    /// The root node (the empty prefix).
    pub fn root(&self) -> u32 {
        0
    }

    /// Number of nodes, root included.
    pub fn num_nodes(&self) -> usize {
        self.parent.len()
    }

    /// Number of items (= leaves).
    pub fn num_items(&self) -> usize {
        self.leaf.len()
    }

    /// Length of the longest item sequence.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Largest token id in any item sequence.
    pub fn max_token(&self) -> u32 {
        self.max_token
    }

    /// `(token, child)` pairs of `node`, sorted by token. Panics if `node` is not a node.
    pub fn children(&self, node: u32) -> &[(u32, u32)] {
        let n = node as usize;
        &self.edges[self.child_start[n] as usize..self.child_start[n + 1] as usize]
    }

    /// The child of `node` along `token`.
    pub fn child(&self, node: u32, token: u32) -> Option<u32> {
        let kids = self.children(node);
        kids.binary_search_by_key(&token, |&(t, _)| t).ok().map(|i| kids[i].1)
    }

    /// The item whose sequence ends at `node` (leaves only).
    pub fn item(&self, node: u32) -> Option<u32> {
        let it = self.item[node as usize];
        (it != NO_ITEM).then_some(it)
    }

    /// Whether `node` ends an item.
    pub fn is_leaf(&self, node: u32) -> bool {
        self.item[node as usize] != NO_ITEM
    }

    /// Length of `node`'s prefix (0 for the root).
    pub fn depth(&self, node: u32) -> usize {
        self.depth[node as usize] as usize
    }

    /// Parent of `node` (`None` for the root).
    pub fn parent(&self, node: u32) -> Option<u32> {
        (node != 0).then(|| self.parent[node as usize])
    }

    /// The token sequence leading from the root to `node`.
    pub fn prefix(&self, node: u32) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.depth(node));
        let mut n = node;
        while n != 0 {
            out.push(self.token[n as usize]);
            n = self.parent[n as usize];
        }
        out.reverse();
        out
    }

    /// The leaf node of `item`, if it is an item index.
    pub fn leaf(&self, item: u32) -> Option<u32> {
        self.leaf.get(item as usize).copied()
    }

    /// The token sequence of `item`, if it is an item index.
    pub fn sequence(&self, item: u32) -> Option<Vec<u32>> {
        self.leaf(item).map(|l| self.prefix(l))
    }

    /// Follows `tokens` from the root; `None` if they leave the trie.
    pub fn walk(&self, tokens: &[u32]) -> Option<u32> {
        tokens.iter().try_fold(self.root(), |n, &t| self.child(n, t))
    }

    /// Positions in [`ItemTrie::items_in_order`] of the items under `node`.
    pub fn item_range(&self, node: u32) -> Range<usize> {
        self.range_start[node as usize] as usize..self.range_end[node as usize] as usize
    }

    /// The items whose sequences start with `node`'s prefix, in sequence order.
    pub fn items_under(&self, node: u32) -> &[u32] {
        &self.order[self.item_range(node)]
    }

    /// All items sorted by their token sequences (the DFS order of the leaves).
    pub fn items_in_order(&self) -> &[u32] {
        &self.order
    }
}

/// Marks "no child" in [`FlatTrie::first`] and "no node" in the device beam state.
pub const NO_NODE: u32 = u32::MAX;

/// The trie as the flat arrays the device beam step reads (docs/kernels/decode.md): children in
/// CSR form as two parallel arrays (token, child node; sorted by token within a node), the item
/// of each node (`u32::MAX` for inner nodes), and a dense first-level table `first[token]` = the
/// root's child along `token` or [`NO_NODE`] (the one level whose fan-out may span much of the
/// vocabulary: an O(1) lookup instead of a search). Built once per item set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatTrie {
    pub child_start: Vec<u32>,
    pub child_token: Vec<u32>,
    pub child_node: Vec<u32>,
    pub node_item: Vec<u32>,
    pub first: Vec<u32>,
    pub vocab: usize,
    pub num_items: usize,
    pub max_len: usize,
    /// Largest number of children of any node (bounds a beam's candidates per step).
    pub max_fanout: usize,
}

impl FlatTrie {
    /// Flattens `trie` for a vocabulary of `vocab` tokens (every item token must be below it),
    /// then validates the result.
    pub fn new(trie: &ItemTrie, vocab: usize) -> Result<FlatTrie> {
        if trie.max_token() as usize >= vocab || vocab >= NO_NODE as usize {
            return Err(Error::Input(format!("flat trie: item token {} is outside the vocabulary ({vocab} tokens)", trie.max_token())));
        }
        let mut first = vec![NO_NODE; vocab];
        for &(t, c) in trie.children(trie.root()) {
            first[t as usize] = c;
        }
        let max_fanout = trie.child_start.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        let flat = FlatTrie {
            child_start: trie.child_start.clone(),
            child_token: trie.edges.iter().map(|e| e.0).collect(),
            child_node: trie.edges.iter().map(|e| e.1).collect(),
            node_item: trie.item.clone(),
            first,
            vocab,
            num_items: trie.num_items(),
            max_len: trie.max_len(),
            max_fanout,
        };
        flat.validate()?;
        Ok(flat)
    }

    pub fn num_nodes(&self) -> usize {
        self.node_item.len()
    }

    /// The invariants the device step relies on without checking them (it indexes with these
    /// values): CSR offsets monotone and covering the edges, tokens strictly increasing within a
    /// node and inside the vocabulary, children numbered after their parent (preorder, so no
    /// cycles and every path ends within `num_nodes` steps), leaves exactly the nodes without
    /// children, items in range, and `first` equal to the root's children. An error names the
    /// node or token at fault.
    pub fn validate(&self) -> Result<()> {
        let n = self.num_nodes();
        let e = self.child_token.len();
        let bad = |m: String| Err(Error::Input(format!("flat trie: {m}")));
        if n == 0 || self.child_start.len() != n + 1 || self.child_node.len() != e || self.first.len() != self.vocab {
            return bad(format!("array lengths do not fit ({n} nodes, {} offsets, {e} tokens, {} child nodes, first level {} for vocab {})", self.child_start.len(), self.child_node.len(), self.first.len(), self.vocab));
        }
        if self.child_start[0] != 0 || self.child_start[n] as usize != e {
            return bad(format!("child offsets must run from 0 to {e}"));
        }
        let mut items = 0usize;
        for node in 0..n {
            let (s, t) = (self.child_start[node] as usize, self.child_start[node + 1] as usize);
            if t < s {
                return bad(format!("node {node}: child offsets decrease"));
            }
            let toks = &self.child_token[s..t];
            if let Some(w) = toks.windows(2).find(|w| w[0] >= w[1]) {
                return bad(format!("node {node}: child tokens {} and {} are not strictly increasing", w[0], w[1]));
            }
            if let Some(&tok) = toks.iter().find(|&&tok| tok as usize >= self.vocab) {
                return bad(format!("node {node}: child token {tok} is outside the vocabulary ({})", self.vocab));
            }
            if let Some(&c) = self.child_node[s..t].iter().find(|&&c| c as usize <= node || c as usize >= n) {
                return bad(format!("node {node}: child node {c} is not a later node (of {n})"));
            }
            let item = self.node_item[node];
            match (item == NO_ITEM, t == s) {
                (true, true) => return bad(format!("node {node} has neither children nor an item")),
                (false, false) => return bad(format!("node {node} has both children and item {item}")),
                (false, true) if item as usize >= self.num_items => return bad(format!("node {node}: item {item} >= {} items", self.num_items)),
                (false, true) => items += 1,
                (true, false) => {}
            }
        }
        if items != self.num_items || self.node_item[0] != NO_ITEM {
            return bad(format!("{items} leaves for {} items (the root must be inner)", self.num_items));
        }
        for (tok, &c) in self.first.iter().enumerate() {
            if c != self.csr_child(0, tok as u32).unwrap_or(NO_NODE) {
                return bad(format!("first-level table entry for token {tok} is {c}, not the root's child"));
            }
        }
        Ok(())
    }

    /// `(first edge, end)` of `node`'s children.
    pub fn edges(&self, node: u32) -> std::ops::Range<usize> {
        self.child_start[node as usize] as usize..self.child_start[node as usize + 1] as usize
    }

    /// The child of `node` along `token` (the dense table at the root, a binary search below).
    pub fn child(&self, node: u32, token: u32) -> Option<u32> {
        if node == 0 {
            return self.first.get(token as usize).copied().filter(|&c| c != NO_NODE);
        }
        self.csr_child(node, token)
    }

    fn csr_child(&self, node: u32, token: u32) -> Option<u32> {
        let r = self.edges(node);
        self.child_token[r.clone()].binary_search(&token).ok().map(|i| self.child_node[r.start + i])
    }

    /// The item ending at `node` (leaves only).
    pub fn item(&self, node: u32) -> Option<u32> {
        let it = self.node_item[node as usize];
        (it != NO_ITEM).then_some(it)
    }
}

/// `n` distinct synthetic semantic-ID items over `vocab` tokens: three codes of 256 (the first
/// skewed: half the items share 16 first codes) then the end token `vocab - 1`, codes in the
/// vocabulary's last `3 * 256 + 1` ids. The item sets of the decode checks, benches and the HF
/// side-by-side (docs/kernels/decode.md). Needs `n <= 256^3` and `vocab > 3 * 256`.
pub fn synthetic_semantic_items(rng: &mut crate::rng::Rng, n: usize, vocab: usize) -> Vec<Vec<u32>> {
    assert!(n <= 1 << 24 && vocab > 3 * 256, "synthetic items: {n} items over {vocab} tokens");
    let base = (vocab - 3 * 256 - 1) as u32;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < n {
        let a = if rng.below(2) == 0 { rng.below(16) } else { rng.below(256) } as u32;
        let (b, c) = (rng.below(256) as u32, rng.below(256) as u32);
        seen.insert(vec![base + a, base + 256 + b, base + 512 + c, vocab as u32 - 1]);
    }
    seen.into_iter().collect()
}
