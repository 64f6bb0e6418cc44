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
