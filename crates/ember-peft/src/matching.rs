//! Which modules an adapter applies to: peft's `check_target_module_exists`,
//! `get_pattern_key` and the per-architecture default targets, in one place.

use crate::config::{OneOrMany, TargetModules};
use crate::error::{config_error, Result};
use regex::Regex;
use std::collections::BTreeMap;

/// peft's default targets for one architecture.
#[derive(Debug, Clone, Copy)]
pub struct DefaultTargets {
    /// LoRA's `target_modules`.
    pub lora: &'static [&'static str],
    /// IA3's `target_modules`.
    pub ia3: &'static [&'static str],
    /// IA3's `feedforward_modules`.
    pub ia3_feedforward: &'static [&'static str],
}

/// peft 0.21's `TRANSFORMERS_MODELS_TO_{LORA,IA3}_TARGET_MODULES_MAPPING` (and the
/// feed-forward mapping) for the architectures Ember has, by `model_type`.
pub fn defaults(model_type: &str) -> Option<DefaultTargets> {
    Some(match model_type {
        "bert" | "roberta" => DefaultTargets {
            lora: &["query", "value"],
            ia3: &["key", "value", "output.dense"],
            ia3_feedforward: &["output.dense"],
        },
        "llama" | "qwen2" | "mistral" => DefaultTargets {
            lora: &["q_proj", "v_proj"],
            ia3: &["k_proj", "v_proj", "down_proj"],
            ia3_feedforward: &["down_proj"],
        },
        "bloom" => DefaultTargets {
            lora: &["query_key_value"],
            ia3: &["query_key_value", "mlp.dense_4h_to_h"],
            ia3_feedforward: &["mlp.dense_4h_to_h"],
        },
        "gpt2" => DefaultTargets {
            lora: &["c_attn"],
            ia3: &["c_attn", "mlp.c_proj"],
            ia3_feedforward: &["mlp.c_proj"],
        },
        _ => return None,
    })
}

/// A compiled `target_modules` (or `exclude_modules`, `feedforward_modules`) matcher.
#[derive(Debug, Clone)]
pub enum Matcher {
    /// `re.fullmatch(pattern, name)`.
    Regex(Regex),
    /// Exact names or `.`-suffixes.
    Names(Vec<String>),
}

impl Matcher {
    /// Compiles the configured targets; `field` names the config field in errors.
    pub fn new(targets: &TargetModules, field: &str) -> Result<Self> {
        Ok(match targets {
            TargetModules::Regex(p) => Self::Regex(
                Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| config_error(field, format!("`{p}` is not a valid regex: {e}")))?,
            ),
            TargetModules::Names(n) => Self::Names(n.clone()),
        })
    }

    /// Whether the module `path` matches, ignoring `layers_to_transform`.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::Regex(r) => r.is_match(path),
            Self::Names(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
        }
    }

    /// As [`Matcher::matches`], but a list entry matches any name ending with it, dot or not
    /// (how peft tests IA3's `feedforward_modules`).
    pub fn matches_suffix(&self, path: &str) -> bool {
        match self {
            Self::Regex(r) => r.is_match(path),
            Self::Names(names) => names.iter().any(|n| path.ends_with(n.as_str())),
        }
    }

    /// Whether this is a list (the only form `layers_to_transform` restricts).
    pub fn is_list(&self) -> bool {
        matches!(self, Self::Names(_))
    }
}

/// What decides whether one module gets an adapter.
#[derive(Debug, Clone)]
pub struct TargetSelector {
    targets: Matcher,
    exclude: Option<Matcher>,
    layers: Option<(Vec<usize>, Vec<String>)>,
}

impl TargetSelector {
    /// From a config's `target_modules`, `exclude_modules`, `layers_to_transform` and
    /// `layers_pattern`.
    pub fn new(
        targets: &TargetModules,
        exclude: Option<&TargetModules>,
        layers_to_transform: Option<&OneOrMany<usize>>,
        layers_pattern: Option<&OneOrMany<String>>,
    ) -> Result<Self> {
        Ok(Self {
            targets: Matcher::new(targets, "target_modules")?,
            exclude: exclude
                .map(|e| Matcher::new(e, "exclude_modules"))
                .transpose()?,
            layers: layers_to_transform.map(|l| {
                (
                    l.to_vec(),
                    layers_pattern.map(OneOrMany::to_vec).unwrap_or_default(),
                )
            }),
        })
    }

    /// Whether the module `path` is excluded.
    pub fn is_excluded(&self, path: &str) -> bool {
        self.exclude.as_ref().is_some_and(|e| e.matches(path))
    }

    /// peft's `check_target_module_exists`: the name matches, is not excluded, and (for a list
    /// of targets with `layers_to_transform`) sits in one of the chosen layers.
    pub fn selects(&self, path: &str) -> bool {
        if self.is_excluded(path) || !self.targets.matches(path) {
            return false;
        }
        let Some((indices, patterns)) = &self.layers else {
            return true;
        };
        if !self.targets.is_list() || indices.is_empty() {
            return true;
        }
        layer_index(path, patterns).is_some_and(|i| indices.contains(&i))
    }
}

/// The layer number in `path`: after one of `patterns` (`{pattern}.N.`), or the first number
/// after a `.{name}.` when there is no pattern (peft's `r".*?\.[^.]*\.(\d+)\."`).
fn layer_index(path: &str, patterns: &[String]) -> Option<usize> {
    let regexes: Vec<String> = if patterns.is_empty() {
        vec![r"^.*?\.[^.]*\.(\d+)\.".to_owned()]
    } else {
        patterns
            .iter()
            .map(|p| format!(r"^(?:|.*?\.){p}\.(\d+)\."))
            .collect()
    };
    regexes.iter().find_map(|r| {
        Regex::new(r)
            .ok()?
            .captures(path)?
            .get(1)?
            .as_str()
            .parse()
            .ok()
    })
}

/// peft's `get_pattern_key` over `rank_pattern` / `alpha_pattern`: the value of the first key
/// that equals the module name or matches its end after a dot (`(.*\.)?key$`).
pub fn pattern_value<T: Copy>(patterns: &BTreeMap<String, T>, path: &str) -> Option<T> {
    if let Some(v) = patterns.get(path) {
        return Some(*v);
    }
    patterns.iter().find_map(|(key, v)| {
        Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
            .ok()
            .filter(|r| r.is_match(path))
            .map(|_| *v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(t: TargetModules) -> TargetSelector {
        TargetSelector::new(&t, None, None, None).unwrap()
    }

    #[test]
    fn a_list_matches_names_and_dotted_suffixes() {
        let s = selector(TargetModules::names(["query", "output.dense"]));
        assert!(s.selects("bert.encoder.layer.0.attention.self.query"));
        assert!(s.selects("query"));
        assert!(s.selects("bert.encoder.layer.1.output.dense"));
        assert!(s.selects("bert.encoder.layer.1.attention.output.dense"));
        assert!(!s.selects("bert.encoder.layer.0.attention.self.myquery"));
        assert!(!s.selects("bert.encoder.layer.0.intermediate.dense"));
    }

    #[test]
    fn a_string_is_a_full_match_regex() {
        let s = selector(TargetModules::Regex(r".*\.1.*query_key_value".into()));
        assert!(s.selects("transformer.h.1.self_attention.query_key_value"));
        assert!(s.selects("transformer.h.11.self_attention.query_key_value"));
        assert!(!s.selects("transformer.h.0.self_attention.query_key_value"));
        // fullmatch: a prefix match is not enough.
        let s = selector(TargetModules::Regex("q_proj".into()));
        assert!(!s.selects("model.layers.0.self_attn.q_proj"));
    }

    #[test]
    fn layers_to_transform_reads_the_layer_index() {
        let t = TargetModules::names(["query"]);
        let pattern = OneOrMany::One("layer".to_owned());
        let s =
            TargetSelector::new(&t, None, Some(&OneOrMany::Many(vec![1])), Some(&pattern)).unwrap();
        assert!(!s.selects("bert.encoder.layer.0.attention.self.query"));
        assert!(s.selects("bert.encoder.layer.1.attention.self.query"));
        let s = TargetSelector::new(&t, None, Some(&OneOrMany::One(0)), None).unwrap();
        assert!(s.selects("bert.encoder.layer.0.attention.self.query"));
    }

    #[test]
    fn exclusions_win() {
        let t = TargetModules::names(["dense"]);
        let e = TargetModules::names(["attention.output.dense"]);
        let s = TargetSelector::new(&t, Some(&e), None, None).unwrap();
        assert!(!s.selects("bert.encoder.layer.0.attention.output.dense"));
        assert!(s.selects("bert.encoder.layer.0.output.dense"));
    }

    #[test]
    fn patterns_match_suffixes() {
        let p = BTreeMap::from([("key".to_owned(), 2usize)]);
        assert_eq!(
            pattern_value(&p, "bert.encoder.layer.0.attention.self.key"),
            Some(2)
        );
        assert_eq!(
            pattern_value(&p, "bert.encoder.layer.0.attention.self.monkey"),
            None
        );
    }
}
