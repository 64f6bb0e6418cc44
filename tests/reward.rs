//! CRR token rewards (ILREC.md section 6) against a hand-derived example.
use ilrec::rec::reward::{item_distribution, RewardTable};

#[test]
fn rewards_match_hand_derivation() {
    // Candidates in column order; four items of three levels.
    let cand = [10u32, 11, 12, 20, 21, 30, 31];
    let items = vec![vec![10u32, 20, 30], vec![10, 20, 31], vec![10, 21, 30], vec![11, 20, 30]];
    let r = [0.1f32, 0.2, 0.3, 0.4];
    let t = RewardTable::new(&items, &cand).unwrap();
    let got = t.rewards(&r, 1, 4).unwrap();
    // Target item 1 = (10, 20, 31). Position 0: all items; 10 holds items 0-2 (0.6), 11 item 3.
    // Position 1: under 10 (mass 0.6): 20 holds items 0, 1 (0.3), 21 item 2 (0.3).
    // Position 2: under (10, 20) (mass 0.3): 30 item 0 (0.1), 31 item 1 (0.2). Row 3 (EOS): 0.
    let want: [[f64; 7]; 4] = [
        [0.6, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0 / 3.0, 2.0 / 3.0],
        [0.0; 7],
    ];
    for (row, w) in want.iter().enumerate() {
        for (j, &wv) in w.iter().enumerate() {
            let g = got[row * 7 + j] as f64;
            assert!((g - wv).abs() < 1e-6, "row {row} column {j}: got {g}, want {wv}");
        }
    }
    // Target item 3 = (11, 20, 30): below 11 only item 3 lives, so the rest of its path is certain.
    let got = t.rewards(&r, 3, 3).unwrap();
    assert!((got[1] - 0.4).abs() < 1e-6 && (got[7 + 3] - 1.0).abs() < 1e-6 && (got[14 + 5] - 1.0).abs() < 1e-6, "{got:?}");
}

#[test]
fn rewards_reject_bad_input() {
    let items = vec![vec![1u32, 3], vec![2, 3]];
    assert!(RewardTable::new(&items, &[1, 2]).unwrap_err().to_string().contains("token 3 of item 0"));
    let t = RewardTable::new(&items, &[1, 2, 3]).unwrap();
    assert!(t.rewards(&[0.5], 0, 3).is_err(), "wrong number of probabilities");
    assert!(t.rewards(&[0.5, f32::NAN], 0, 3).unwrap_err().to_string().contains("item 1"));
    assert!(t.rewards(&[0.5, 0.5], 2, 3).is_err(), "unknown target");
}

#[test]
fn item_distribution_is_a_softmax() {
    let s = [1.0f32, -2.0, 0.5, 80.0, 79.0];
    let p = item_distribution(&s);
    let z: f64 = s.iter().map(|&x| (x as f64 - 80.0).exp()).sum();
    for (&x, &q) in s.iter().zip(&p) {
        assert!(((x as f64 - 80.0).exp() / z - q as f64).abs() < 1e-7);
    }
}
