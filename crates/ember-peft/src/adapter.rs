//! What every adapter-carrying layer shares: peft's `BaseTunerLayer` state (the active
//! adapters, the merged ones, whether adapters are disabled) and the operations on its named
//! adapters.

use crate::error::{PeftError, Result};

/// The adapter bookkeeping of one layer (peft's `active_adapters`, `merged_adapters`,
/// `disable_adapters`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdapterState {
    /// The adapters that the forward pass applies, in order.
    pub active: Vec<String>,
    /// The adapters whose update has been added into the base weight.
    pub merged: Vec<String>,
    /// When set, the forward pass runs the base layer alone.
    pub disabled: bool,
}

impl AdapterState {
    /// Whether `name` takes part in the forward pass as a separate term: active, not merged,
    /// adapters enabled.
    pub fn applies(&self, name: &str) -> bool {
        !self.disabled && self.active.iter().any(|a| a == name) && !self.is_merged(name)
    }

    /// Whether `name` is merged into the base weight.
    pub fn is_merged(&self, name: &str) -> bool {
        self.merged.iter().any(|m| m == name)
    }
}

/// A named adapter held by a layer.
pub(crate) trait Named {
    fn name(&self) -> &str;
}

/// Position of the adapter `name` in `adapters`, or the typed error naming what exists.
pub(crate) fn find<A: Named>(adapters: &[A], name: &str) -> Result<usize> {
    adapters
        .iter()
        .position(|a| a.name() == name)
        .ok_or_else(|| PeftError::UnknownAdapter {
            name: name.to_owned(),
            known: adapters.iter().map(|a| a.name().to_owned()).collect(),
        })
}

/// The kaiming-uniform bound PyTorch uses for `nn.Linear` weights (`a = sqrt(5)`):
/// `1 / sqrt(fan_in)`.
pub(crate) fn kaiming_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in.max(1) as f64).sqrt()
}
