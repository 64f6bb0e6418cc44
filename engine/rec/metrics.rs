//! Full-ranking metrics with one relevant item per user (ILREC.md section 1, "Metrics").
use serde::{Deserialize, Serialize};

/// 0-based position of `target` in `ranked`.
pub fn rank_of(ranked: &[u32], target: u32) -> Option<usize> {
    ranked.iter().position(|&i| i == target)
}

/// 1 if `target` is among the first `k` of `ranked`, else 0.
pub fn hit_at_k(ranked: &[u32], target: u32, k: usize) -> f64 {
    match rank_of(ranked, target) {
        Some(r) if r < k => 1.0,
        _ => 0.0,
    }
}

/// NDCG@k with one relevant item: `1 / log2(rank + 2)` for a 0-based rank below `k`, else 0
/// (the ideal DCG is 1).
pub fn ndcg_at_k(ranked: &[u32], target: u32, k: usize) -> f64 {
    match rank_of(ranked, target) {
        Some(r) if r < k => 1.0 / ((r + 2) as f64).log2(),
        _ => 0.0,
    }
}

/// Means over `n` users of Hit@5, Hit@10, NDCG@5 and NDCG@10. Start from `Metrics::default()`,
/// [`Metrics::add`] each user's ranking, [`Metrics::merge`] partial results.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub hit5: f64,
    pub hit10: f64,
    pub ndcg5: f64,
    pub ndcg10: f64,
    /// Users averaged over.
    pub n: usize,
}

impl Metrics {
    /// The metrics of one user.
    pub fn of(ranked: &[u32], target: u32) -> Metrics {
        Metrics {
            hit5: hit_at_k(ranked, target, 5),
            hit10: hit_at_k(ranked, target, 10),
            ndcg5: ndcg_at_k(ranked, target, 5),
            ndcg10: ndcg_at_k(ranked, target, 10),
            n: 1,
        }
    }

    /// Adds one user (running mean).
    pub fn add(&mut self, ranked: &[u32], target: u32) {
        self.merge(&Metrics::of(ranked, target));
    }

    /// Combines two means, weighted by their user counts.
    pub fn merge(&mut self, other: &Metrics) {
        let n = self.n + other.n;
        if n == 0 {
            return;
        }
        let (wa, wb) = (self.n as f64 / n as f64, other.n as f64 / n as f64);
        self.hit5 = wa * self.hit5 + wb * other.hit5;
        self.hit10 = wa * self.hit10 + wb * other.hit10;
        self.ndcg5 = wa * self.ndcg5 + wb * other.ndcg5;
        self.ndcg10 = wa * self.ndcg10 + wb * other.ndcg10;
        self.n = n;
    }

    /// The mean metrics of `(ranking, target)` pairs.
    pub fn from_rankings<'a>(pairs: impl IntoIterator<Item = (&'a [u32], u32)>) -> Metrics {
        let mut m = Metrics::default();
        for (ranked, target) in pairs {
            m.add(ranked, target);
        }
        m
    }
}
