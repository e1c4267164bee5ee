//! HF's logits processors and warpers (`logits_process.py`), applied on the host to one row of
//! scores at a time, in the order of `GenerationMixin._get_logits_processor`:
//!
//! 1. `repetition_penalty` (skipping each row's left padding, HF's `prompt_ignore_length`),
//! 2. `no_repeat_ngram_size`, 3. `bad_words_ids`, 4. `min_length`, 5. `min_new_tokens`,
//! 6. `forced_bos_token_id`, 7. `forced_eos_token_id`;
//!
//! then, only when sampling, the warpers: temperature, `top_k`, `top_p`, `typical_p`,
//! `epsilon_cutoff`. Arithmetic is float32 as in PyTorch (cumulative sums accumulate in
//! float64, as PyTorch's CPU `cumsum` does), so that the same tokens survive a threshold.

use super::GenerationConfig;
use crate::error::{ModelError, Result};
use std::collections::HashSet;

/// The processors of one `generate` call (HF's `LogitsProcessorList`), built from a
/// [`GenerationConfig`] for a prompt length and a `max_length`.
#[derive(Debug, Clone)]
pub struct LogitsProcessorList {
    repetition_penalty: f32,
    no_repeat_ngram_size: usize,
    bad_words: Vec<Vec<u32>>,
    eos: Vec<u32>,
    min_length: usize,
    min_new_tokens: usize,
    prompt_len: usize,
    forced_bos: Option<u32>,
    forced_eos: Vec<u32>,
    max_length: usize,
    warpers: Option<Warpers>,
}

/// The sampling warpers with HF's `min_tokens_to_keep`.
#[derive(Debug, Clone)]
struct Warpers {
    temperature: f32,
    top_k: usize,
    top_p: f64,
    typical_p: f64,
    epsilon_cutoff: f64,
    min_tokens_to_keep: usize,
}

impl LogitsProcessorList {
    /// The processors HF builds for `config`, a prompt of `prompt_len` positions (padding
    /// included), `max_length` (prompt plus new tokens) and a vocabulary of `vocab` ids.
    /// Token ids of `bad_words_ids` and `forced_*_token_id` beyond the vocabulary are an error
    /// naming them (HF raises too).
    pub fn new(
        config: &GenerationConfig,
        prompt_len: usize,
        max_length: usize,
        vocab: usize,
    ) -> Result<Self> {
        config.validate().map_err(ModelError::Input)?;
        let eos = config.eos_ids().map_err(ModelError::Input)?;
        let outside = |what: &str, id: u32| {
            ModelError::Input(format!(
                "{what} names token {id}, beyond the vocabulary of {vocab} ids"
            ))
        };
        let mut bad_words = Vec::new();
        for seq in config.bad_words_ids.iter().flatten() {
            if let Some(&id) = seq.iter().find(|&&t| t as usize >= vocab) {
                return Err(outside("bad_words_ids", id));
            }
            // HF drops a bad word that is a single EOS id: EOS stays allowed.
            if !(seq.len() == 1 && eos.contains(&seq[0])) {
                bad_words.push(seq.clone());
            }
        }
        if let Some(id) = config.forced_bos_token_id.filter(|&t| t as usize >= vocab) {
            return Err(outside("forced_bos_token_id", id));
        }
        let forced_eos = config.forced_eos_ids().map_err(ModelError::Input)?;
        if let Some(&id) = forced_eos.iter().find(|&&t| t as usize >= vocab) {
            return Err(outside("forced_eos_token_id", id));
        }
        // HF's `_prepare_generated_length`: `min_new_tokens` replaces `min_length`.
        let min_length = if config.min_new_tokens > 0 {
            config.min_new_tokens + prompt_len
        } else {
            config.min_length
        };
        let warpers = config.do_sample.then(|| Warpers {
            temperature: config.temperature as f32,
            top_k: config.top_k,
            top_p: config.top_p,
            typical_p: config.typical_p,
            epsilon_cutoff: config.epsilon_cutoff,
            // Beam search keeps a non-EOS continuation next to every EOS id.
            min_tokens_to_keep: if config.num_beams > 1 {
                (eos.len() + 1).max(2)
            } else {
                1
            },
        });
        Ok(Self {
            repetition_penalty: config.repetition_penalty as f32,
            no_repeat_ngram_size: config.no_repeat_ngram_size,
            bad_words,
            eos,
            min_length,
            min_new_tokens: config.min_new_tokens,
            prompt_len,
            forced_bos: config.forced_bos_token_id,
            forced_eos,
            max_length,
            warpers,
        })
    }

    /// Processes the scores of the next token of one row whose ids so far (prompt with its
    /// padding, then the new tokens) are `input_ids`; `prompt_ignore` leading positions (the
    /// row's left padding) are not penalised for repetition.
    pub fn process(&self, input_ids: &[u32], prompt_ignore: usize, scores: &mut [f32]) {
        let cur_len = input_ids.len();
        if self.repetition_penalty != 1.0 {
            repetition_penalty(
                scores,
                input_ids.get(prompt_ignore..).unwrap_or(&[]),
                self.repetition_penalty,
            );
        }
        if self.no_repeat_ngram_size > 0 {
            no_repeat_ngram(scores, input_ids, self.no_repeat_ngram_size);
        }
        for seq in &self.bad_words {
            let (prefix, last) = seq.split_at(seq.len() - 1);
            if prefix.len() <= cur_len && input_ids.ends_with(prefix) {
                scores[last[0] as usize] = f32::NEG_INFINITY;
            }
        }
        if !self.eos.is_empty() {
            let short = (self.min_length > 0 && cur_len < self.min_length)
                || (self.min_new_tokens > 0
                    && cur_len.saturating_sub(self.prompt_len) < self.min_new_tokens);
            if short {
                for &id in &self.eos {
                    if let Some(s) = scores.get_mut(id as usize) {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
        }
        if let Some(bos) = self.forced_bos.filter(|_| cur_len == 1) {
            force(scores, &[bos]);
        }
        if !self.forced_eos.is_empty() && cur_len + 1 == self.max_length {
            force(scores, &self.forced_eos);
        }
        if let Some(w) = &self.warpers {
            w.apply(scores);
        }
    }

    /// Whether the sampling warpers are part of the list.
    pub fn samples(&self) -> bool {
        self.warpers.is_some()
    }
}

impl Warpers {
    fn apply(&self, scores: &mut [f32]) {
        if self.temperature != 1.0 {
            scores.iter_mut().for_each(|s| *s /= self.temperature);
        }
        if self.top_k != 0 {
            top_k(scores, self.top_k.max(self.min_tokens_to_keep));
        }
        if self.top_p < 1.0 {
            top_p(scores, self.top_p, self.min_tokens_to_keep);
        }
        if self.typical_p < 1.0 {
            typical(scores, self.typical_p, self.min_tokens_to_keep);
        }
        if self.epsilon_cutoff > 0.0 && self.epsilon_cutoff < 1.0 {
            epsilon(scores, self.epsilon_cutoff, self.min_tokens_to_keep);
        }
    }
}

/// HF's `ForcedBOSTokenLogitsProcessor` / `ForcedEOSTokenLogitsProcessor`: every score -inf
/// but those of `ids`, which become 0.
fn force(scores: &mut [f32], ids: &[u32]) {
    scores.fill(f32::NEG_INFINITY);
    for &id in ids {
        scores[id as usize] = 0.0;
    }
}

/// HF's `RepetitionPenaltyLogitsProcessor`: divides positive and multiplies negative scores
/// of every id in `seen`, once per id.
pub(crate) fn repetition_penalty(scores: &mut [f32], seen: &[u32], penalty: f32) {
    let mut done = HashSet::new();
    for &t in seen {
        let t = t as usize;
        if t < scores.len() && done.insert(t) {
            let s = scores[t];
            scores[t] = if s < 0.0 { s * penalty } else { s / penalty };
        }
    }
}

/// HF's `NoRepeatNGramLogitsProcessor`: every n-gram of `ids` whose first n - 1 tokens equal
/// the last n - 1 tokens bans its last token.
fn no_repeat_ngram(scores: &mut [f32], ids: &[u32], n: usize) {
    let len = ids.len();
    if len < n {
        return;
    }
    let suffix = &ids[len + 1 - n..];
    for start in 0..=len - n {
        if ids[start..start + n - 1] == *suffix {
            if let Some(s) = scores.get_mut(ids[start + n - 1] as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
}

/// Indices sorted by score, ascending or descending; ties keep index order.
fn sorted(scores: &[f32], descending: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    if descending {
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    } else {
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    }
    order
}

/// `torch.softmax` in float32.
pub(crate) fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    exps.iter().map(|e| e / total).collect()
}

/// `torch.log_softmax` in float32.
pub(crate) fn log_softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f32 = scores.iter().map(|&s| (s - max).exp()).sum();
    let log_total = total.ln();
    scores.iter().map(|&s| s - max - log_total).collect()
}

/// A cumulative sum accumulated in float64 and stored in float32 (PyTorch's CPU `cumsum`).
fn cumsum(values: &[f32]) -> Vec<f32> {
    let mut acc = 0f64;
    values
        .iter()
        .map(|&v| {
            acc += v as f64;
            acc as f32
        })
        .collect()
}

/// HF's `TopKLogitsWarper`: removes scores below the k-th largest (ties with it stay).
fn top_k(scores: &mut [f32], k: usize) {
    let k = k.min(scores.len());
    let threshold = scores[sorted(scores, true)[k - 1]];
    scores
        .iter_mut()
        .filter(|s| **s < threshold)
        .for_each(|s| *s = f32::NEG_INFINITY);
}

/// HF's `TopPLogitsWarper`: removes the tokens whose ascending cumulative probability is at
/// most 1 - top_p, keeping the `min_keep` most likely.
fn top_p(scores: &mut [f32], top_p: f64, min_keep: usize) {
    let order = sorted(scores, false);
    let probs = softmax(&order.iter().map(|&i| scores[i]).collect::<Vec<_>>());
    let cum = cumsum(&probs);
    let limit = (1.0 - top_p) as f32;
    let keep_from = order.len().saturating_sub(min_keep);
    for (rank, &i) in order.iter().enumerate() {
        if rank < keep_from && cum[rank] <= limit {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// HF's `TypicalLogitsWarper`: keeps the tokens whose surprise is closest to the entropy until
/// their probability reaches `mass`.
fn typical(scores: &mut [f32], mass: f64, min_keep: usize) {
    let normalized = log_softmax(scores);
    // `nansum`: -inf * 0 is NaN and left out.
    let ent: f32 = -normalized
        .iter()
        .map(|&l| l * l.exp())
        .filter(|v| !v.is_nan())
        .sum::<f32>();
    let shifted: Vec<f32> = normalized.iter().map(|&l| (-l - ent).abs()).collect();
    let order = sorted(&shifted, false);
    let probs = softmax(&order.iter().map(|&i| scores[i]).collect::<Vec<_>>());
    let cum = cumsum(&probs);
    let mass = mass as f32;
    let last = cum
        .iter()
        .filter(|&&c| c < mass)
        .count()
        .min(order.len() - 1);
    let threshold = shifted[order[last]];
    for (rank, &i) in order.iter().enumerate() {
        if rank >= min_keep && shifted[i] > threshold {
            scores[i] = f32::NEG_INFINITY;
        }
    }
}

/// HF's `EpsilonLogitsWarper`: removes tokens with probability below `epsilon`, except the
/// `min_keep` most likely.
fn epsilon(scores: &mut [f32], epsilon: f64, min_keep: usize) {
    let probs = softmax(scores);
    let k = min_keep.min(scores.len());
    let kth = scores[sorted(scores, true)[k - 1]];
    let epsilon = epsilon as f32;
    for (s, p) in scores.iter_mut().zip(probs) {
        if p < epsilon && *s < kth {
            *s = f32::NEG_INFINITY;
        }
    }
}

/// The first index of the largest score (`torch.argmax`).
pub(crate) fn argmax(scores: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}

/// The index of the first non-zero entry of a mask row (HF's `prompt_ignore_length`: the left
/// padding); 0 when the row has none.
pub(crate) fn padding_length(mask: &[u32]) -> usize {
    mask.iter().position(|&m| m != 0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_repeat_ngram_bans_the_tokens_that_would_repeat_an_ngram() {
        let mut s = vec![0.0; 8];
        // Bigrams (1,2), (2,3), (3,1): the suffix 1 was followed by 2 before.
        no_repeat_ngram(&mut s, &[1, 2, 3, 1], 2);
        assert_eq!(s[2], f32::NEG_INFINITY);
        assert_eq!(s.iter().filter(|v| v.is_infinite()).count(), 1);
    }

    #[test]
    fn typical_with_tiny_mass_keeps_one_token() {
        let mut s = vec![3.0, 1.0, 0.5, 0.2, -1.0];
        typical(&mut s, 1e-3, 1);
        assert_eq!(s.iter().filter(|v| v.is_finite()).count(), 1, "{s:?}");
    }
}
