//! A tokenizer that needs nothing downloaded: BERT WordPiece trained on a small corpus written
//! for this project. The `ember tokenize` demo and the doc examples use it.

use crate::auto::AutoTokenizer;
use crate::config::{SpecialTokens, TokenizerConfig};
use crate::error::Result;
use crate::legacy::{self, BertOptions};
use serde_json::{Map, Value};
use std::path::Path;

/// The demo corpus: short English and Chinese sentences about hotels, food and travel, written
/// for Ember (not taken from any dataset).
pub const DEMO_CORPUS: &[&str] = &[
    "The room was clean and the staff were friendly.",
    "Breakfast was cold and the coffee tasted burnt.",
    "We loved the view of the river from our balcony.",
    "The bed was too soft and the air conditioner was noisy all night.",
    "Check-in took five minutes; the receptionist spoke good English.",
    "The hotel is close to the subway station, which made travel easy.",
    "Our train left late, but the conductor apologised and served tea.",
    "The noodles at the corner shop were cheap, hot and delicious.",
    "I would not stay here again: the bathroom smelled of smoke.",
    "A quiet, comfortable room at a fair price. Recommended!",
    "The museum opens at nine and closes early on Mondays.",
    "Tokenizers split text into pieces that a model can count.",
    "Fine-tuning a small model on labelled reviews takes minutes.",
    "房间很干净，服务员也很热情。",
    "早餐太凉了，咖啡也不好喝。",
    "从阳台可以看到河景，我们很喜欢。",
    "床太软，空调整晚都很吵。",
    "酒店离地铁站很近，出行非常方便。",
    "街角小店的面条又便宜又好吃。",
    "浴室有烟味，我不会再住这里了。",
    "安静舒适的房间，价格合理，推荐！",
    "火车晚点了，但是列车员道了歉还送了茶。",
    "博物馆九点开门，周一提前关门。",
];

impl AutoTokenizer {
    /// A BERT WordPiece tokenizer over `vocab` (one token per id, as in `vocab.txt`), built as
    /// `BertTokenizer(vocab, ...)` builds it; the BERT special tokens are added when missing.
    pub fn bert_wordpiece(vocab: &[String], options: &BertOptions) -> Result<Self> {
        let special = SpecialTokens::bert();
        let mut map = Map::new();
        for t in special.all().iter().chain(vocab) {
            if !map.contains_key(t) {
                let id = map.len();
                map.insert(t.clone(), Value::from(id));
            }
        }
        let json =
            legacy::bert_wordpiece_json(map, options, "[UNK]", "[CLS]", "[SEP]", &special.all());
        let mut config = TokenizerConfig::default();
        config
            .raw
            .insert("tokenizer_class".into(), "BertTokenizer".into());
        config.tokenizer_class = Some("BertTokenizer".into());
        config.model_max_length = Some(512);
        Self::from_pipeline_json(json, Path::new("<bert_wordpiece>"), config, special)
    }
}

/// The demo tokenizer: BERT WordPiece (lower case, Chinese characters split) trained on
/// [`DEMO_CORPUS`] with a vocabulary of at most 600 entries.
///
/// ```
/// let tok = ember_tokenizers::demo::demo_tokenizer()?;
/// assert_eq!(tok.tokenize("The room was clean")?, ["the", "room", "was", "clean"]);
/// # Ok::<(), ember_tokenizers::TokenizerError>(())
/// ```
pub fn demo_tokenizer() -> Result<AutoTokenizer> {
    let base = AutoTokenizer::bert_wordpiece(&[], &BertOptions::default())?;
    base.train_new_from_iterator(DEMO_CORPUS.iter(), 600)
}
