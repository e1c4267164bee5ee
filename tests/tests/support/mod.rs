//! What several test files share.

use ember::datasets::Dataset;
use serde_json::json;

/// 64 sequences of 4-10 ids starting with id 2, drawn from an LCG seeded with `seed`; the label
/// says whether id 5 occurs (a rule a tiny classifier learns in a few epochs).
pub fn contains_five(seed: u64) -> Dataset {
    let mut state = seed;
    let mut next = move |n: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    let rows: Vec<_> = (0..64)
        .map(|_| {
            let len = 4 + next(7) as usize;
            let mut ids: Vec<u64> = (0..len)
                .map(|i| if i == 0 { 2 } else { 6 + next(24) })
                .collect();
            if next(2) == 1 {
                ids[1 + next(len as u64 - 1) as usize] = 5;
            }
            let label = ids.contains(&5) as u64;
            json!({"input_ids": ids, "attention_mask": vec![1; len], "label": label})
        })
        .collect();
    Dataset::from_json_rows(&rows).unwrap()
}
