//! burn's data traits, so that burn-train's own dataloader can use Ember datasets and collators.

use crate::collate::{Batch, Collator, Example, ExampleDataset};
use crate::error::Result;
use burn::data::dataloader::batcher::Batcher;
use burn::tensor::backend::Backend;

impl burn::data::dataset::Dataset<Example> for ExampleDataset {
    fn get(&self, index: usize) -> Option<Example> {
        ExampleDataset::get(self, index)
    }

    fn len(&self) -> usize {
        ExampleDataset::len(self)
    }
}

/// Any [`Collator`] as a burn [`Batcher`]: `BurnBatcher(DataCollatorWithPadding::new(0))`.
///
/// burn's `Batcher` cannot fail, so the batch comes back as a `Result`: a collator refuses
/// batches it cannot pad (mixed examples), and that refusal reaches the training loop as an
/// error instead of a panic inside burn's worker threads.
#[derive(Debug, Clone)]
pub struct BurnBatcher<C>(pub C);

impl<B: Backend, C: Collator> Batcher<B, Example, Result<Batch<B>>> for BurnBatcher<C> {
    fn batch(&self, items: Vec<Example>, device: &B::Device) -> Result<Batch<B>> {
        self.0.collate::<B>(&items, device)
    }
}
