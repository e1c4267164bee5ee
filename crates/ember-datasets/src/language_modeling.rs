//! HF `DataCollatorForLanguageModeling`: causal (`mlm=False`, labels = the inputs) and masked
//! (`mlm=True`, BERT's 80 / 10 / 10 masking of `torch_mask_tokens`), with a seeded generator.

use crate::collate::{
    pad_inputs, pad_to, Collator, Example, PaddedBatch, PaddedLabels, PaddingSide, IGNORE_INDEX,
};
use crate::error::{DatasetError, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::{Arc, Mutex};

/// The `mlm=True` settings of [`DataCollatorForLanguageModeling`], with HF's names and defaults:
/// `mlm_probability` 0.15, `mask_replace_prob` 0.8, `random_replace_prob` 0.1, `seed` none.
///
/// The tokenizer's part of HF's collator is given as ids, since this crate knows no tokenizer:
/// `mask_token_id` (`tokenizer.mask_token_id`), `vocab_size` (`len(tokenizer)`, added tokens
/// included: random replacements are drawn from `0..vocab_size`) and `all_special_ids`
/// (`tokenizer.all_special_ids`: where a batch has no `special_tokens_mask`, these ids are
/// never masked, as `get_special_tokens_mask(already_has_special_tokens=True)` does).
///
/// ```
/// use ember_datasets::MlmConfig;
/// // bert-base-chinese: [MASK] = 103, 21128 tokens, specials [PAD] [UNK] [CLS] [SEP] [MASK].
/// let config = MlmConfig::new(Some(103), 21128, [0, 100, 101, 102, 103]).seed(42);
/// assert_eq!((config.mlm_probability, config.mask_replace_prob), (0.15, 0.8));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct MlmConfig {
    /// The id masked positions are mostly replaced with (`tokenizer.mask_token_id`); `None`
    /// (a tokenizer without mask token) is refused by [`DataCollatorForLanguageModeling::mlm`].
    pub mask_token_id: Option<i64>,
    /// `len(tokenizer)`: random replacements are drawn uniformly from `0..vocab_size`.
    pub vocab_size: usize,
    /// `tokenizer.all_special_ids`: never masked when the examples carry no
    /// `special_tokens_mask`.
    pub all_special_ids: Vec<i64>,
    /// The probability that a (non-special) token is selected for prediction; default 0.15.
    pub mlm_probability: f64,
    /// The probability that a selected token is replaced with the mask token; default 0.8.
    pub mask_replace_prob: f64,
    /// The probability that a selected token is replaced with a random token; default 0.1. The
    /// rest (`1 - mask_replace_prob - random_replace_prob`) is left unchanged.
    pub random_replace_prob: f64,
    /// The seed of the collator's own generator; `None` seeds it from the operating system
    /// (HF then draws from torch's global generator).
    pub seed: Option<u64>,
}

impl MlmConfig {
    /// HF's defaults for a tokenizer with this mask token, vocabulary size and special ids.
    pub fn new(
        mask_token_id: Option<i64>,
        vocab_size: usize,
        all_special_ids: impl IntoIterator<Item = i64>,
    ) -> Self {
        Self {
            mask_token_id,
            vocab_size,
            all_special_ids: all_special_ids.into_iter().collect(),
            mlm_probability: 0.15,
            mask_replace_prob: 0.8,
            random_replace_prob: 0.1,
            seed: None,
        }
    }

    /// Sets `mlm_probability`.
    pub fn mlm_probability(mut self, p: f64) -> Self {
        self.mlm_probability = p;
        self
    }

    /// Sets `mask_replace_prob`.
    pub fn mask_replace_prob(mut self, p: f64) -> Self {
        self.mask_replace_prob = p;
        self
    }

    /// Sets `random_replace_prob`.
    pub fn random_replace_prob(mut self, p: f64) -> Self {
        self.random_replace_prob = p;
        self
    }

    /// Sets `seed`.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// HF's `__post_init__` checks, returning the mask token id: a mask token must exist (and,
    /// here, lie in the vocabulary), and every probability must lie in [0, 1] with
    /// `mask_replace_prob + random_replace_prob <= 1`.
    pub fn validate(&self) -> Result<i64> {
        let invalid = |name: &'static str, value: String, message: &str| {
            Err(DatasetError::InvalidArgument {
                name,
                value,
                message: message.into(),
            })
        };
        let Some(mask) = self.mask_token_id else {
            return invalid(
                "mask_token",
                "None".into(),
                "this tokenizer has no mask token, which masked language modeling needs; use \
                 mlm=False (DataCollatorForLanguageModeling::new) for causal language modeling",
            );
        };
        if mask < 0 || mask as u64 >= self.vocab_size as u64 {
            return invalid(
                "mask_token_id",
                mask.to_string(),
                &format!("must be a token of the vocabulary (0..{})", self.vocab_size),
            );
        }
        // `contains` is false for NaN, so NaN is refused with the out-of-range values.
        for (name, p) in [
            ("mlm_probability", self.mlm_probability),
            ("mask_replace_prob", self.mask_replace_prob),
            ("random_replace_prob", self.random_replace_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return invalid(name, p.to_string(), "should be between 0 and 1");
            }
        }
        if self.mask_replace_prob + self.random_replace_prob > 1.0 {
            return invalid(
                "random_replace_prob",
                self.random_replace_prob.to_string(),
                &format!(
                    "the sum of mask_replace_prob ({}) and random_replace_prob should not exceed 1",
                    self.mask_replace_prob
                ),
            );
        }
        Ok(mask)
    }
}

/// A validated [`MlmConfig`] and the generator the masks are drawn from.
#[derive(Debug, Clone)]
struct Masking {
    config: MlmConfig,
    mask_token_id: i64,
    /// Shared by clones: the `Trainer` clones its collator for each data loader, and HF's one
    /// collator object keeps drawing from one generator across epochs and evaluations.
    rng: Arc<Mutex<StdRng>>,
}

impl Masking {
    /// `torch_mask_tokens` on one padded batch, in place: selects each position whose
    /// `no_mask` is false with `mlm_probability`; of the selected, `mask_replace_prob` become
    /// the mask token, `random_replace_prob` a uniform random token, the rest stay. Returns the
    /// labels: the original id where selected, -100 elsewhere.
    fn mask(&self, input_ids: &mut [i64], no_mask: &[bool]) -> Vec<i64> {
        let c = &self.config;
        // HF draws the random replacements only among the selected tokens not already replaced
        // by the mask token, so it scales the probability to that remainder (0.1 / 0.2 = 0.5
        // by default). Rounding can push the quotient past 1 (0.2 / (1 - 0.8)): clamp it, as
        // `random_bool` takes probabilities in [0, 1] only.
        let random_stage = c.mask_replace_prob < 1.0 && c.random_replace_prob > 0.0;
        let random_scaled = if random_stage {
            (c.random_replace_prob / (1.0 - c.mask_replace_prob)).min(1.0)
        } else {
            0.0
        };
        // The generator always holds a valid state (nothing panics while it is locked), so a
        // poisoned lock is taken over as it is.
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let mut labels = vec![IGNORE_INDEX; input_ids.len()];
        for ((id, label), &skip) in input_ids.iter_mut().zip(&mut labels).zip(no_mask) {
            if skip || !rng.random_bool(c.mlm_probability) {
                continue;
            }
            *label = *id;
            if rng.random_bool(c.mask_replace_prob) {
                *id = self.mask_token_id;
            } else if random_stage && rng.random_bool(random_scaled) {
                // `validate` made sure that vocab_size > mask_token_id >= 0.
                *id = rng.random_range(0..c.vocab_size as i64);
            }
        }
        labels
    }
}

/// HF `DataCollatorForLanguageModeling(tokenizer, mlm=..., mlm_probability=0.15,
/// mask_replace_prob=0.8, random_replace_prob=0.1, pad_to_multiple_of=..., seed=...)`: the
/// inputs padded as [`DataCollatorWithPadding`](crate::DataCollatorWithPadding) does, and then:
///
/// * **causal** ([`DataCollatorForLanguageModeling::new`], `mlm=False`): `labels` a copy of the
///   padded `input_ids` with -100 wherever the id equals `pad_token_id`. Exactly as HF, the -100
///   goes on every position whose id is `pad_token_id`, not only on padding: when the pad token
///   is also the end-of-text token (GPT-2's usual `pad_token = eos_token`), real end-of-text
///   tokens get no loss either. The model shifts the labels itself.
/// * **masked** ([`DataCollatorForLanguageModeling::mlm`], `mlm=True`): HF's
///   `torch_mask_tokens`. Each token is selected with `mlm_probability`, except special tokens
///   (the examples' `special_tokens_mask` where they carry one, padded with 1 as the tokenizer
///   pads it; otherwise the ids in [`MlmConfig::all_special_ids`]) and padding, which are never
///   selected. `labels` hold the original id at selected positions and -100 elsewhere; of the
///   selected inputs, 80 % become the mask token, 10 % a token drawn uniformly from the whole
///   vocabulary (which may be the original one), and 10 % stay unchanged.
///
/// Labels the examples carry are replaced in both modes. Padding is never masked even when the
/// pad id is missing from `all_special_ids` (HF would then mask it).
///
/// The masks come from the collator's own generator, seeded by [`MlmConfig::seed`]: the same
/// seed gives the same masks for the same sequence of batches. Clones share the generator.
/// With `num_workers > 0` the workers draw from it in the order they collate, which depends on
/// thread timing, so reproducible masks need `num_workers = 0` (the `Trainer`'s default); the
/// draws are Ember's own, not torch's, so the masks differ from HF's while their statistics
/// agree (`tests/tests/mlm_collator.rs`).
///
/// ```
/// use ember_datasets::{Collator, DataCollatorForLanguageModeling, Example, MlmConfig, PaddedLabels};
/// // Causal: the labels are the ids, -100 on padding.
/// let causal = DataCollatorForLanguageModeling::new(50256);
/// let batch = causal.pad(&[Example::new(vec![15, 16, 17]), Example::new(vec![15])])?;
/// assert_eq!(batch.labels, Some(PaddedLabels::Tokens(vec![15, 16, 17, 15, -100, -100])));
///
/// // Masked, bert-base-chinese's ids, padded to a multiple of 8.
/// let config = MlmConfig::new(Some(103), 21128, [0, 100, 101, 102, 103]).seed(7);
/// let collator = DataCollatorForLanguageModeling::mlm(0, config)?.pad_to_multiple_of(8);
/// let batch = collator.pad(&[Example::new(vec![101, 2769, 4638, 1962, 102])])?;
/// assert_eq!(batch.seq_len, 8);
/// let Some(PaddedLabels::Tokens(labels)) = batch.labels else { unreachable!() };
/// // [CLS], [SEP] and the padding are never selected.
/// assert!([0, 4, 5, 6, 7].iter().all(|&i| labels[i] == -100));
/// # Ok::<(), ember_datasets::DatasetError>(())
/// ```
#[derive(Debug, Clone)]
pub struct DataCollatorForLanguageModeling {
    /// The id padding is written with (`tokenizer.pad_token_id`); in causal mode its positions
    /// get label -100.
    pub pad_token_id: i64,
    /// Which side to pad on (`tokenizer.padding_side`); default right.
    pub padding_side: PaddingSide,
    /// Round the padded length up to a multiple of this.
    pub pad_to_multiple_of: Option<usize>,
    masking: Option<Masking>,
}

impl DataCollatorForLanguageModeling {
    /// A causal-LM collator (`mlm=False`) padding on the right with `pad_token_id`.
    pub fn new(pad_token_id: i64) -> Self {
        Self {
            pad_token_id,
            padding_side: PaddingSide::Right,
            pad_to_multiple_of: None,
            masking: None,
        }
    }

    /// A masked-LM collator (`mlm=True`) padding on the right with `pad_token_id`.
    ///
    /// Errors ([`DatasetError::InvalidArgument`], naming the value): no mask token, a mask
    /// token outside the vocabulary, a probability outside [0, 1], or `mask_replace_prob +
    /// random_replace_prob > 1` (see [`MlmConfig::validate`]).
    pub fn mlm(pad_token_id: i64, config: MlmConfig) -> Result<Self> {
        let mask_token_id = config.validate()?;
        let rng = match config.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Self {
            masking: Some(Masking {
                config,
                mask_token_id,
                rng: Arc::new(Mutex::new(rng)),
            }),
            ..Self::new(pad_token_id)
        })
    }

    /// HF's `mlm`: true for a masked-LM collator.
    pub fn is_mlm(&self) -> bool {
        self.masking.is_some()
    }

    /// The masked-LM settings; `None` for a causal collator.
    pub fn mlm_config(&self) -> Option<&MlmConfig> {
        self.masking.as_ref().map(|m| &m.config)
    }

    /// HF's `torch_mask_tokens` on one sequence (or a row-major batch), in place: masks
    /// `input_ids` where `special_tokens_mask` is 0 and returns the labels (-100 where not
    /// selected). Draws from the collator's generator.
    ///
    /// Errors: a causal collator, or a `special_tokens_mask` of another length.
    pub fn mask_tokens(
        &self,
        input_ids: &mut [i64],
        special_tokens_mask: &[i64],
    ) -> Result<Vec<i64>> {
        let Some(masking) = &self.masking else {
            return Err(DatasetError::InvalidArgument {
                name: "mlm",
                value: "False".into(),
                message:
                    "mask_tokens needs a masked-LM collator (DataCollatorForLanguageModeling::mlm)"
                        .into(),
            });
        };
        if special_tokens_mask.len() != input_ids.len() {
            return Err(DatasetError::Shape(format!(
                "`special_tokens_mask` has {} values but `input_ids` has {}",
                special_tokens_mask.len(),
                input_ids.len()
            )));
        }
        let no_mask: Vec<bool> = special_tokens_mask.iter().map(|&s| s != 0).collect();
        Ok(masking.mask(input_ids, &no_mask))
    }

    /// Which positions of the padded batch may not be masked: special tokens and padding.
    fn no_mask(
        &self,
        masking: &Masking,
        rows: &[Example],
        batch: &PaddedBatch,
    ) -> Result<Vec<bool>> {
        let size = batch.batch_size * batch.seq_len;
        let with_column = rows[0].special_tokens_mask.is_some();
        let mut special = Vec::with_capacity(size);
        let mut padding = Vec::with_capacity(size);
        for (i, row) in rows.iter().enumerate() {
            let len = row.input_ids.len();
            // 1 on the positions padding added, whatever their id.
            pad_to(
                &vec![0; len],
                batch.seq_len,
                1,
                self.padding_side,
                &mut padding,
            );
            match (&row.special_tokens_mask, with_column) {
                (Some(m), true) if m.len() != len => {
                    return Err(DatasetError::Shape(format!(
                        "example {i} of the batch: `special_tokens_mask` has {} values but \
                         `input_ids` has {len}",
                        m.len()
                    )))
                }
                // The tokenizer pads `special_tokens_mask` with 1.
                (Some(m), true) => pad_to(m, batch.seq_len, 1, self.padding_side, &mut special),
                (None, false) => {}
                _ => {
                    return Err(DatasetError::Shape(format!(
                        "example {i} of the batch {} `special_tokens_mask` but example 0 {}",
                        if with_column { "has no" } else { "has a" },
                        if with_column { "has one" } else { "has none" },
                    )))
                }
            }
        }
        if !with_column {
            let ids = &masking.config.all_special_ids;
            special.extend(batch.input_ids.iter().map(|id| i64::from(ids.contains(id))));
        }
        Ok(special
            .iter()
            .zip(&padding)
            .map(|(&s, &p)| s != 0 || p != 0)
            .collect())
    }
}

impl Collator for DataCollatorForLanguageModeling {
    fn pad(&self, rows: &[Example]) -> Result<PaddedBatch> {
        let mut batch = pad_inputs(
            rows,
            self.pad_token_id,
            self.padding_side,
            self.pad_to_multiple_of,
        )?;
        let labels = match &self.masking {
            Some(masking) => {
                let no_mask = self.no_mask(masking, rows, &batch)?;
                masking.mask(&mut batch.input_ids, &no_mask)
            }
            None => batch
                .input_ids
                .iter()
                .map(|&id| {
                    if id == self.pad_token_id {
                        IGNORE_INDEX
                    } else {
                        id
                    }
                })
                .collect(),
        };
        batch.labels = Some(PaddedLabels::Tokens(labels));
        Ok(batch)
    }
}
