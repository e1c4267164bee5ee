//! The models' projections split over a tensor-parallel group (Megatron's split of attention
//! heads and MLP units; see `ember_distributed::TensorParallel`).
//!
//! A block's first projections (query / key / value, up / gate, BERT's intermediate) keep a
//! slice of their output features, its last projection (attention output, down / BERT's
//! output) the matching slice of its input features. The HF keys stay as they are, so a
//! split model's parameters are found by the same names; [`gather_projection`] puts the
//! whole layer back together for saving.

use crate::error::{ModelError, Result};
use burn::tensor::backend::Backend;
use ember_distributed::TensorParallel;
use ember_peft::Projection;

/// Which side of a split block a projection is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Split {
    /// Output features sliced: a block's first projections.
    Column,
    /// Input features sliced: a block's last projection (its bias on rank 0 alone).
    Row,
}

/// This rank's slice of `layer` (HF key `key`), which must be a plain layer: adapters and
/// quantized weights are not split.
pub(crate) fn slice_projection<B: Backend>(
    layer: Projection<B>,
    tp: &TensorParallel,
    split: Split,
    key: &str,
) -> Result<Projection<B>> {
    if !layer.adapters.is_empty() || layer.quantized.is_some() {
        return Err(ModelError::Input(format!(
            "{key}: tensor parallel splits plain layers, not adapters or quantized weights: \
             split the base model"
        )));
    }
    let mut layer = layer;
    layer.base = match split {
        Split::Column => tp.column_slice(layer.base, key)?,
        Split::Row => tp.row_slice(layer.base, key)?,
    };
    Ok(layer)
}

/// The whole layer of which every rank holds a [`slice_projection`]; `has_bias` says whether
/// the whole layer has a bias (a row slice keeps it on rank 0 alone).
pub(crate) fn gather_projection<B: Backend>(
    mut layer: Projection<B>,
    tp: &TensorParallel,
    split: Split,
    has_bias: bool,
) -> Result<Projection<B>> {
    layer.base = match split {
        Split::Column => tp.gather_columns(layer.base)?,
        Split::Row => tp.gather_rows(layer.base, has_bias)?,
    };
    Ok(layer)
}

/// The number of heads (or another count, named by `what`) on each rank: the group must
/// divide it, so that every rank holds whole heads.
pub(crate) fn heads_per_rank(count: usize, tp: &TensorParallel, what: &str) -> Result<usize> {
    Ok(tp.shard_range(count, what)?.len())
}
