//! Beam search as transformers ≥ 4.50 / 5 runs it (`GenerationMixin._beam_search`, the
//! vectorised rewrite), on the host: per prompt, `num_beams` running hypotheses and
//! `num_beams` finished slots. Each step takes the top (EOS ids + 1) × `num_beams`
//! continuations of the summed log probabilities, keeps the best `num_beams` that did not stop
//! running, and moves the stopped ones among the best `num_beams` into the finished slots with
//! their score divided by (new tokens) ** `length_penalty`. Scores are float32 and the -1e9
//! markers are added as HF adds them, so that ties and orderings come out the same.

use super::logits::{log_softmax, padding_length, softmax};
use super::{
    next_logits, prepare, EarlyStopping, GenerateOptions, GenerateOutput, GenerationConfig,
    Prepared, Prompt,
};
use crate::causal::{CausalLm, KvCache};
use crate::error::{ModelError, Result};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// HF's marker for a score that must not be chosen.
const NEG: f32 = -1.0e9;

/// A finished slot of one prompt.
#[derive(Clone)]
struct Slot {
    seq: Vec<u32>,
    score: f32,
    finished: bool,
}

/// Indices of the `k` largest values, largest first; ties keep index order.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    order.truncate(k);
    order
}

/// `k` indices drawn without replacement from the softmax of `values` (HF's
/// `torch.multinomial(softmax(...), k)`; Ember's generator, so not PyTorch's draws), sorted by
/// value, largest first.
fn sample_k(values: &[f32], k: usize, rng: &mut StdRng) -> Vec<usize> {
    let mut weights: Vec<f64> = softmax(values).iter().map(|&p| p as f64).collect();
    let mut picked = Vec::with_capacity(k);
    for _ in 0..k {
        let total: f64 = weights.iter().sum();
        let chosen = if total > 0.0 {
            let mut left = rng.random::<f64>() * total;
            let mut chosen = None;
            for (i, &w) in weights.iter().enumerate() {
                if w > 0.0 {
                    chosen = Some(i);
                    if left < w {
                        break;
                    }
                    left -= w;
                }
            }
            chosen
        } else {
            None
        };
        // With fewer candidates of non-zero probability than k, take the best of the rest.
        let i = chosen.unwrap_or_else(|| {
            (0..values.len())
                .filter(|i| !picked.contains(i))
                .max_by(|&a, &b| values[a].total_cmp(&values[b]).then(b.cmp(&a)))
                .expect("k is at most the number of candidates")
        });
        weights[i] = 0.0;
        picked.push(i);
    }
    picked.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    picked
}

/// `score / length ** length_penalty` in float32, the power in float64 (Python's `**`).
fn penalised(score: f32, length: usize, length_penalty: f64) -> f32 {
    score / (length as f64).powf(length_penalty) as f32
}

/// HF's beam search (`num_beams` > 1; with `do_sample`, beam sampling): returns, per prompt
/// row, the `num_return_sequences` best finished hypotheses, best first, with their
/// `sequences_scores`.
pub fn beam_search<B: Backend, M: CausalLm<B>>(
    model: &M,
    prompt: &Prompt,
    config: &GenerationConfig,
    mut options: GenerateOptions<'_>,
    device: &B::Device,
) -> Result<GenerateOutput> {
    if options.streamer.is_some() {
        return Err(ModelError::Input(
            "a streamer cannot be used with beam search (num_beams > 1), as in HF".into(),
        ));
    }
    let num_beams = config.num_beams;
    let Prepared {
        prompt,
        eos,
        pad,
        max_new,
        processors,
    } = prepare(model, prompt, config, num_beams)?;
    let rows = prompt.input_ids.len();
    let batch = rows / num_beams;
    let vocab = model.vocab_size();
    let prompt_len = prompt.input_ids[0].len();
    let max_length = prompt_len + max_new;
    let beams_to_keep = (eos.len() + 1).max(2) * num_beams;
    if beams_to_keep > num_beams * vocab {
        return Err(ModelError::Input(format!(
            "num_beams {num_beams} needs {beams_to_keep} candidates per step, more than the {} that {num_beams} beams over a vocabulary of {vocab} offer",
            num_beams * vocab
        )));
    }
    let lp = config.length_penalty;
    let early = config.early_stopping;
    let mut rng = StdRng::seed_from_u64(options.seed.unwrap_or(0));
    let ignore: Vec<usize> = prompt
        .attention_mask
        .iter()
        .map(|m| padding_length(m))
        .collect();
    // Running hypotheses, `[batch * num_beams]` rows; only the first beam of each prompt starts
    // live, so that the first step does not pick the same token num_beams times.
    let mut running = prompt.input_ids.clone();
    let mut running_scores: Vec<f32> = (0..rows)
        .map(|r| if r % num_beams == 0 { 0.0 } else { NEG })
        .collect();
    let mut mask = prompt.attention_mask.clone();
    let mut slots: Vec<Vec<Slot>> = (0..batch)
        .map(|b| {
            vec![
                Slot {
                    seq: prompt.input_ids[b * num_beams].clone(),
                    score: NEG,
                    finished: false,
                };
                num_beams
            ]
        })
        .collect();
    let mut unsatisfied = vec![true; batch];
    let mut cache: Option<KvCache<B>> = None;
    let mut cur_len = prompt_len;
    loop {
        let logits = next_logits(model, &running, &mask, &mut cache, config.use_cache, device)?;
        let mut log_probs = Vec::with_capacity(rows * vocab);
        for (r, row) in logits.chunks_exact(vocab).enumerate() {
            let mut lp_row = log_softmax(row);
            processors.process(&running[r], ignore[r], &mut lp_row);
            log_probs.extend(lp_row);
        }
        let mut next_running = Vec::with_capacity(rows);
        let mut next_scores = Vec::with_capacity(rows);
        let mut sources = Vec::with_capacity(rows);
        let mut all_hit = true;
        for b in 0..batch {
            // Summed log probabilities of every (beam, token) continuation.
            let acc: Vec<f32> = (0..num_beams * vocab)
                .map(|i| {
                    log_probs[(b * num_beams) * vocab + i]
                        + running_scores[b * num_beams + i / vocab]
                })
                .collect();
            let top = if processors.samples() {
                sample_k(&acc, beams_to_keep, &mut rng)
            } else {
                top_k(&acc, beams_to_keep)
            };
            let mut cand_seqs = Vec::with_capacity(beams_to_keep);
            let mut cand_scores = Vec::with_capacity(beams_to_keep);
            let mut cand_beams = Vec::with_capacity(beams_to_keep);
            let mut hits = Vec::with_capacity(beams_to_keep);
            for &i in &top {
                let beam = i / vocab;
                let token = (i % vocab) as u32;
                let mut seq = running[b * num_beams + beam].clone();
                seq.push(token);
                let hit = eos.contains(&token)
                    || seq.len() >= max_length
                    || options
                        .stopping
                        .iter_mut()
                        .any(|c| c.should_stop(b, &seq[prompt_len..]));
                all_hit &= hit;
                cand_seqs.push(seq);
                cand_scores.push(acc[i]);
                cand_beams.push(beam);
                hits.push(hit);
            }
            // Running beams for the next step: the best candidates that did not stop.
            let running_cands: Vec<f32> = cand_scores
                .iter()
                .zip(&hits)
                .map(|(&s, &h)| s + (h as u8 as f32) * NEG)
                .collect();
            for k in top_k(&running_cands, num_beams) {
                next_running.push(cand_seqs[k].clone());
                next_scores.push(running_cands[k]);
                sources.push((b * num_beams + cand_beams[k]) as i64);
            }
            // Finished slots: the stopped candidates among the best num_beams may enter.
            let full = slots[b].iter().all(|s| s.finished) && early == EarlyStopping::True;
            let new_len = cur_len + 1 - prompt_len;
            let mut merged: Vec<Slot> = slots[b].clone();
            for (k, seq) in cand_seqs.into_iter().enumerate() {
                let just_finished = hits[k] && k < num_beams;
                let mut score = penalised(cand_scores[k], new_len, lp);
                score += (full as u8 as f32) * NEG;
                score += (!unsatisfied[b] as u8 as f32) * NEG;
                score += (!just_finished as u8 as f32) * NEG;
                merged.push(Slot {
                    seq,
                    score,
                    finished: just_finished,
                });
            }
            let merged_scores: Vec<f32> = merged.iter().map(|s| s.score).collect();
            slots[b] = top_k(&merged_scores, num_beams)
                .into_iter()
                .map(|k| merged[k].clone())
                .collect();
        }
        running = next_running;
        running_scores = next_scores;
        for row in &mut mask {
            row.push(1);
        }
        if let Some(c) = cache.take() {
            let index = Tensor::<B, 1, Int>::from_data(TensorData::new(sources, [rows]), device);
            cache = Some(c.select_rows(index));
        }
        cur_len += 1;
        // HF's `_check_early_stop_heuristic`.
        let best_len = if early == EarlyStopping::Never && lp > 0.0 {
            max_length - prompt_len
        } else {
            cur_len - prompt_len
        };
        for b in 0..batch {
            let best_running = penalised(running_scores[b * num_beams], best_len, lp);
            let worst = slots[b]
                .iter()
                .map(|s| s.score)
                .fold(f32::INFINITY, f32::min);
            let improvable = slots[b].iter().any(|s| {
                let worst_finished = if s.finished { worst } else { NEG };
                best_running > worst_finished
            });
            unsatisfied[b] &= improvable;
        }
        let all_full = early == EarlyStopping::True && slots.iter().flatten().all(|s| s.finished);
        if !unsatisfied.iter().any(|&u| u) || all_full || all_hit {
            break;
        }
    }
    // The best `num_return_sequences` slots of each prompt, cropped to the longest and padded
    // with HF's fill value (`pad_token_id or eos_token_id[0]`: a pad id of 0 counts as unset).
    let fill = match (config.pad_token_id, eos.first()) {
        (Some(p), Some(_)) if p != 0 => p as u32,
        (_, Some(&e)) => e,
        _ => pad,
    };
    let keep = config.num_return_sequences;
    let chosen: Vec<&Slot> = slots.iter().flat_map(|s| s.iter().take(keep)).collect();
    let longest = chosen
        .iter()
        .map(|s| s.seq.len())
        .max()
        .unwrap_or(prompt_len);
    let sequences = chosen
        .iter()
        .map(|s| {
            let mut seq = s.seq.clone();
            seq.resize(longest, fill);
            seq
        })
        .collect();
    Ok(GenerateOutput {
        sequences,
        new_tokens: chosen
            .iter()
            .map(|s| s.seq[prompt_len..].to_vec())
            .collect(),
        sequences_scores: Some(chosen.iter().map(|s| s.score).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_descending_with_ties_in_index_order() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, -2.0, 5.0], 3), vec![4, 1, 2]);
    }

    #[test]
    fn sampling_without_replacement_picks_distinct_indices() {
        let mut rng = StdRng::seed_from_u64(4);
        let values = [0.0, -1.0, f32::NEG_INFINITY, -0.5, -3.0];
        for _ in 0..50 {
            let picked = sample_k(&values, 4, &mut rng);
            let mut unique = picked.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), 4, "{picked:?}");
            assert!(picked.windows(2).all(|w| values[w[0]] >= values[w[1]]));
        }
    }

    #[test]
    fn length_penalty_divides_by_a_power_of_the_length() {
        assert_eq!(penalised(-6.0, 4, 0.5), -3.0);
        assert_eq!(penalised(-6.0, 3, 1.0), -2.0);
        assert_eq!(penalised(-6.0, 3, 0.0), -6.0);
    }
}
