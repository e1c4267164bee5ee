//! The collators (HF `DataCollatorWithPadding`, `DataCollatorForTokenClassification`,
//! `DataCollatorForLanguageModeling(mlm=False)`) and the `DataLoader` (shuffle per epoch,
//! `drop_last`, background workers), on small in-memory datasets.

use burn::tensor::{Int, Tensor};
use ember_datasets::arrow::array::{ArrayRef, Int32Array, ListArray};
use ember_datasets::arrow::datatypes::Int32Type;
use ember_datasets::{
    Batch, BatchLabels, Collator, DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification, DataCollatorWithPadding, DataLoader, Dataset, DatasetError,
    Example, ExampleDataset, Label, PaddedBatch, PaddedLabels, PaddingSide,
};
use serde_json::json;
use std::sync::Arc;

type B = burn::backend::Flex;

fn device() -> burn::tensor::Device<B> {
    Default::default()
}

fn matrix(t: &Tensor<B, 2, Int>) -> Vec<Vec<i64>> {
    let [_, cols] = t.dims();
    let flat: Vec<i64> = t.clone().into_data().convert::<i64>().to_vec().unwrap();
    if cols == 0 {
        return vec![Vec::new(); t.dims()[0]];
    }
    flat.chunks(cols).map(<[i64]>::to_vec).collect()
}

fn vector(t: &Tensor<B, 1, Int>) -> Vec<i64> {
    t.clone().into_data().convert::<i64>().to_vec().unwrap()
}

fn token_labels(batch: &Batch<B>) -> Vec<Vec<i64>> {
    match &batch.labels {
        Some(BatchLabels::Tokens(t)) => matrix(t),
        other => panic!("expected token labels, got {other:?}"),
    }
}

fn sequence_labels(batch: &Batch<B>) -> Vec<i64> {
    match &batch.labels {
        Some(BatchLabels::Sequence(t)) => vector(t),
        other => panic!("expected sequence labels, got {other:?}"),
    }
}

/// A sequence-classification dataset: row `i` has `i % 4 + 1` tokens, all `10 * (i + 1)`
/// (so a row is recognisable in a batch), and label `i % 2`.
fn classification_rows(n: usize) -> Dataset {
    let rows: Vec<_> = (0..n)
        .map(|i| {
            let id = 10 * (i as i64 + 1);
            json!({"text": format!("row {i}"), "input_ids": vec![id; i % 4 + 1], "label": i % 2})
        })
        .collect();
    Dataset::from_json_rows(&rows).unwrap()
}

/// The row numbers in a batch of `classification_rows`.
fn row_numbers(batch: &Batch<B>) -> Vec<usize> {
    matrix(&batch.input_ids)
        .iter()
        .map(|r| (r[0] / 10 - 1) as usize)
        .collect()
}

#[test]
fn with_padding_pads_right_builds_mask_and_stacks_labels() {
    let ds = Dataset::from_json_rows(&[
        json!({"input_ids": [101, 7, 8, 102], "token_type_ids": [0, 0, 1, 1], "label": 1}),
        json!({"input_ids": [101, 102], "token_type_ids": [0, 0], "label": 0}),
        json!({"input_ids": [101, 9, 102], "token_type_ids": [0, 1, 1], "label": 2}),
    ])
    .unwrap();
    let rows = ExampleDataset::new(&ds).unwrap();
    assert_eq!(rows.label_column(), Some("label"));
    let examples: Vec<Example> = rows.iter().collect();
    let batch = DataCollatorWithPadding::new(0)
        .collate::<B>(&examples, &device())
        .unwrap();
    assert_eq!((batch.batch_size(), batch.seq_len()), (3, 4));
    assert_eq!(
        matrix(&batch.input_ids),
        [[101, 7, 8, 102], [101, 102, 0, 0], [101, 9, 102, 0]]
    );
    assert_eq!(
        matrix(&batch.attention_mask),
        [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    );
    assert_eq!(
        matrix(batch.token_type_ids.as_ref().unwrap()),
        [[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]]
    );
    assert_eq!(sequence_labels(&batch), [1, 0, 2]);
}

#[test]
fn with_padding_pads_left_and_keeps_given_masks() {
    let examples = [
        Example::new(vec![5, 6, 7]).with_attention_mask(vec![1, 1, 0]),
        Example::new(vec![5]),
    ];
    let collator = DataCollatorWithPadding::new(2).padding_side(PaddingSide::Left);
    let batch = collator.collate::<B>(&examples, &device()).unwrap();
    assert_eq!(matrix(&batch.input_ids), [[5, 6, 7], [2, 2, 5]]);
    assert_eq!(matrix(&batch.attention_mask), [[1, 1, 0], [0, 0, 1]]);
    assert!(batch.token_type_ids.is_none());
    assert!(batch.labels.is_none());
}

#[test]
fn pad_to_multiple_of_rounds_the_length_up() {
    let collator = DataCollatorWithPadding::new(0).pad_to_multiple_of(8);
    let five = collator
        .pad(&[Example::new(vec![1; 5]), Example::new(vec![1; 2])])
        .unwrap();
    assert_eq!(five.seq_len, 8);
    assert_eq!(five.input_ids[..8], [1, 1, 1, 1, 1, 0, 0, 0]);
    assert_eq!(five.attention_mask[8..], [1, 1, 0, 0, 0, 0, 0, 0]);
    let eight = collator.pad(&[Example::new(vec![1; 8])]).unwrap();
    assert_eq!(eight.seq_len, 8);
    let nine = collator.pad(&[Example::new(vec![1; 9])]).unwrap();
    assert_eq!(nine.seq_len, 16);

    let token = DataCollatorForTokenClassification::new(0).pad_to_multiple_of(4);
    let batch = token
        .collate::<B>(
            &[Example::new(vec![3, 4, 5]).with_token_labels(vec![-100, 1, -100])],
            &device(),
        )
        .unwrap();
    assert_eq!(token_labels(&batch), [[-100, 1, -100, -100]]);

    let zero = DataCollatorWithPadding::new(0).pad_to_multiple_of(0);
    assert!(matches!(
        zero.pad(&[Example::new(vec![1])]),
        Err(DatasetError::InvalidArgument {
            name: "pad_to_multiple_of",
            ..
        })
    ));
}

#[test]
fn token_classification_pads_labels_with_minus_100_on_the_padding_side() {
    let ds = Dataset::from_json_rows(&[
        json!({"input_ids": [101, 7, 8, 102], "labels": [-100, 1, 2, -100]}),
        json!({"input_ids": [101, 9, 102], "labels": [-100, 3, -100]}),
    ])
    .unwrap();
    let rows = ExampleDataset::new(&ds).unwrap();
    assert_eq!(
        rows.get(1).unwrap().labels,
        Some(Label::Tokens(vec![-100, 3, -100]))
    );
    let examples: Vec<Example> = rows.iter().collect();

    let right = DataCollatorForTokenClassification::new(0)
        .collate::<B>(&examples, &device())
        .unwrap();
    assert_eq!(
        matrix(&right.input_ids),
        [[101, 7, 8, 102], [101, 9, 102, 0]]
    );
    assert_eq!(
        token_labels(&right),
        [[-100, 1, 2, -100], [-100, 3, -100, -100]]
    );

    let left = DataCollatorForTokenClassification::new(0)
        .padding_side(PaddingSide::Left)
        .label_pad_token_id(-1)
        .collate::<B>(&examples, &device())
        .unwrap();
    assert_eq!(
        matrix(&left.input_ids),
        [[101, 7, 8, 102], [0, 101, 9, 102]]
    );
    assert_eq!(matrix(&left.attention_mask), [[1, 1, 1, 1], [0, 1, 1, 1]]);
    assert_eq!(
        token_labels(&left),
        [[-100, 1, 2, -100], [-1, -100, 3, -100]]
    );

    // One label per sequence is refused, and so is a label list longer than the batch.
    let scalar =
        DataCollatorForTokenClassification::new(0).pad(&[Example::new(vec![1]).with_label(0)]);
    assert!(matches!(
        scalar,
        Err(DatasetError::InvalidArgument { name: "labels", .. })
    ));
    let long = DataCollatorForTokenClassification::new(0)
        .pad(&[Example::new(vec![1]).with_token_labels(vec![0, 0])]);
    assert!(matches!(long, Err(DatasetError::Shape(_))));
    // And a per-token label list by the sequence collator.
    let tokens =
        DataCollatorWithPadding::new(0).pad(&[Example::new(vec![1]).with_token_labels(vec![0])]);
    assert!(matches!(
        tokens,
        Err(DatasetError::InvalidArgument { name: "labels", .. })
    ));
}

#[test]
fn language_modeling_labels_copy_ids_with_minus_100_on_pad_ids() {
    let eos = 50256;
    let examples = [
        // A real end-of-text token equal to the pad token is masked too, exactly as HF does.
        Example::new(vec![15, 16, eos]).with_token_labels(vec![9, 9, 9]),
        Example::new(vec![15]),
    ];
    let right = DataCollatorForLanguageModeling::new(eos)
        .collate::<B>(&examples, &device())
        .unwrap();
    assert_eq!(matrix(&right.input_ids), [[15, 16, eos], [15, eos, eos]]);
    assert_eq!(matrix(&right.attention_mask), [[1, 1, 1], [1, 0, 0]]);
    assert_eq!(token_labels(&right), [[15, 16, -100], [15, -100, -100]]);

    let left = DataCollatorForLanguageModeling::new(0)
        .padding_side(PaddingSide::Left)
        .pad_to_multiple_of(4)
        .pad(&examples)
        .unwrap();
    assert_eq!(left.input_ids, [0, 15, 16, eos, 0, 0, 0, 15]);
    assert_eq!(
        left.labels,
        Some(PaddedLabels::Tokens(vec![
            -100, 15, 16, eos, -100, -100, -100, 15
        ]))
    );
}

#[test]
fn examples_read_int32_lists_and_check_columns() {
    let lists = |rows: Vec<Vec<i32>>| -> ArrayRef {
        Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(
            rows.into_iter().map(|r| Some(r.into_iter().map(Some))),
        ))
    };
    let ds = Dataset::from_columns(vec![
        ("input_ids", lists(vec![vec![1, 2, 3], vec![4]])),
        ("attention_mask", lists(vec![vec![1, 1, 1], vec![1]])),
        ("label", Arc::new(Int32Array::from(vec![3, 4])) as ArrayRef),
    ])
    .unwrap();
    let rows = ExampleDataset::new(&ds).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows.example(0).unwrap(),
        Example::new(vec![1, 2, 3])
            .with_attention_mask(vec![1, 1, 1])
            .with_label(3)
    );
    assert!(rows.get(2).is_none());
    assert!(matches!(
        rows.example(2),
        Err(DatasetError::IndexOutOfRange { index: 2, len: 2 })
    ));

    // `labels` wins over `label`; a null optional value means "none" for that row.
    let ds = Dataset::from_json_rows(&[
        json!({"input_ids": [1, 2], "label": 0, "labels": 5, "token_type_ids": [0, 1]}),
        json!({"input_ids": [3], "label": 1, "labels": 6, "token_type_ids": null}),
    ])
    .unwrap();
    let rows = ExampleDataset::new(&ds).unwrap();
    assert_eq!(rows.label_column(), Some("labels"));
    assert_eq!(rows.get(1).unwrap(), Example::new(vec![3]).with_label(6));

    // A mask of another length than its ids.
    let bad = Dataset::from_json_rows(&[json!({"input_ids": [1, 2], "attention_mask": [1]})]);
    assert!(matches!(
        ExampleDataset::new(&bad.unwrap()),
        Err(DatasetError::Shape(m)) if m.contains("attention_mask")
    ));
    // A string label (not class-encoded yet).
    let text = Dataset::from_json_rows(&[json!({"input_ids": [1], "label": "pos"})]).unwrap();
    assert!(matches!(
        ExampleDataset::new(&text),
        Err(DatasetError::ColumnType { column, .. }) if column == "label"
    ));
    // `input_ids` that are not a list of integers.
    let text = Dataset::from_json_rows(&[json!({"input_ids": "hello"})]).unwrap();
    assert!(matches!(
        ExampleDataset::new(&text),
        Err(DatasetError::ColumnType { column, .. }) if column == "input_ids"
    ));
    // A null `input_ids` row.
    let null =
        Dataset::from_json_rows(&[json!({"input_ids": [1]}), json!({"input_ids": null})]).unwrap();
    assert!(matches!(
        ExampleDataset::new(&null),
        Err(DatasetError::Shape(m)) if m.contains("row 1")
    ));
}

#[test]
fn missing_input_ids_is_a_missing_column_error() {
    let ds = Dataset::from_json_rows(&[json!({"text": "not tokenized", "label": 1})]).unwrap();
    let err = DataLoader::new(&ds, DataCollatorWithPadding::new(0), 2).unwrap_err();
    match err {
        DatasetError::MissingColumn { name, available } => {
            assert_eq!(name, "input_ids");
            assert!(available.contains("text"));
        }
        other => panic!("expected MissingColumn, got {other:?}"),
    }
    assert!(matches!(
        ExampleDataset::new(&ds),
        Err(DatasetError::MissingColumn { .. })
    ));
    let ok = classification_rows(3);
    assert!(matches!(
        DataLoader::new(&ok, DataCollatorWithPadding::new(0), 0),
        Err(DatasetError::InvalidArgument {
            name: "batch_size",
            ..
        })
    ));
    // An empty batch and a batch with `token_type_ids` on some examples only.
    assert!(DataCollatorWithPadding::new(0).pad(&[]).is_err());
    let mixed = DataCollatorWithPadding::new(0).pad(&[
        Example::new(vec![1]).with_token_type_ids(vec![0]),
        Example::new(vec![1]),
    ]);
    assert!(matches!(mixed, Err(DatasetError::Shape(_))));
    let some_labels = DataCollatorWithPadding::new(0)
        .pad(&[Example::new(vec![1]).with_label(1), Example::new(vec![1])]);
    assert!(matches!(some_labels, Err(DatasetError::Shape(_))));
}

#[test]
fn loader_in_order_without_shuffle() {
    let ds = classification_rows(5);
    let loader = DataLoader::new(&ds, DataCollatorWithPadding::new(0), 2).unwrap();
    assert_eq!(loader.len(), 3);
    assert_eq!(loader.batch_indices(0), [vec![0, 1], vec![2, 3], vec![4]]);
    assert_eq!(loader.batch_indices(7), loader.batch_indices(0));
    let batches: Vec<Batch<B>> = loader
        .iter::<B>(0, &device())
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(batches.len(), 3);
    assert_eq!(matrix(&batches[0].input_ids), [[10, 0], [20, 20]]);
    assert_eq!(sequence_labels(&batches[0]), [0, 1]);
    assert_eq!(matrix(&batches[2].input_ids), [[50]]);
    assert_eq!(sequence_labels(&batches[2]), [0]);
}

#[test]
fn shuffle_is_deterministic_per_seed_and_differs_across_epochs() {
    let ds = classification_rows(40);
    let make = |seed| {
        DataLoader::new(&ds, DataCollatorWithPadding::new(0), 8)
            .unwrap()
            .shuffle(true)
            .seed(seed)
    };
    let a = make(7);
    let b = make(7);
    for epoch in 0..3 {
        assert_eq!(a.batch_indices(epoch), b.batch_indices(epoch));
        // Each epoch is a permutation of the rows.
        let mut all: Vec<usize> = a.batch_indices(epoch).concat();
        all.sort_unstable();
        assert_eq!(all, (0..40).collect::<Vec<_>>());
    }
    assert_ne!(a.batch_indices(0), a.batch_indices(1));
    assert_ne!(a.batch_indices(1), a.batch_indices(2));
    assert_ne!(a.batch_indices(0), make(8).batch_indices(0));
    assert_ne!(a.batch_indices(0).concat(), (0..40).collect::<Vec<_>>());

    // The batches hold the rows the indices name.
    for epoch in 0..2 {
        let rows: Vec<Vec<usize>> = a
            .iter::<B>(epoch, &device())
            .map(|b| row_numbers(&b.unwrap()))
            .collect();
        assert_eq!(rows, a.batch_indices(epoch));
    }
}

#[test]
fn drop_last_counts() {
    let ds = classification_rows(10);
    let keep = DataLoader::new(&ds, DataCollatorWithPadding::new(0), 3).unwrap();
    assert_eq!(keep.len(), 4);
    let sizes: Vec<usize> = keep
        .iter::<B>(0, &device())
        .map(|b| b.unwrap().batch_size())
        .collect();
    assert_eq!(sizes, [3, 3, 3, 1]);

    let drop = keep.clone().drop_last(true).shuffle(true);
    assert_eq!(drop.len(), 3);
    let sizes: Vec<usize> = drop
        .iter::<B>(1, &device())
        .map(|b| b.unwrap().batch_size())
        .collect();
    assert_eq!(sizes, [3, 3, 3]);

    let exact = DataLoader::new(&ds, DataCollatorWithPadding::new(0), 5)
        .unwrap()
        .drop_last(true);
    assert_eq!(exact.len(), 2);
    let too_big = DataLoader::new(&ds, DataCollatorWithPadding::new(0), 11)
        .unwrap()
        .drop_last(true);
    assert!(too_big.is_empty());
    assert_eq!(too_big.iter::<B>(0, &device()).count(), 0);

    let empty = classification_rows(3).select(&[]).unwrap();
    let none = DataLoader::new(&empty, DataCollatorWithPadding::new(0), 2)
        .unwrap()
        .num_workers(2);
    assert!(none.is_empty());
    assert_eq!(none.iter::<B>(0, &device()).count(), 0);
}

/// `input_ids`, `attention_mask` and `labels` of one batch, as plain vectors.
type Contents = (Vec<Vec<i64>>, Vec<Vec<i64>>, Vec<i64>);

fn contents(batches: Vec<Batch<B>>) -> Vec<Contents> {
    batches
        .iter()
        .map(|b| {
            (
                matrix(&b.input_ids),
                matrix(&b.attention_mask),
                sequence_labels(b),
            )
        })
        .collect()
}

#[test]
fn workers_give_the_same_batches_in_the_same_order() {
    let ds = classification_rows(23);
    let base = DataLoader::new(
        &ds,
        DataCollatorWithPadding::new(0).pad_to_multiple_of(2),
        4,
    )
    .unwrap()
    .shuffle(true)
    .seed(3);
    for epoch in 0..2 {
        let expected = contents(
            base.iter::<B>(epoch, &device())
                .collect::<Result<_, _>>()
                .unwrap(),
        );
        assert_eq!(expected.len(), 6);
        for (workers, prefetch) in [(1, 1), (2, 2), (3, 1), (16, 4)] {
            let loader = base.clone().num_workers(workers).prefetch_factor(prefetch);
            let got = contents(
                loader
                    .iter::<B>(epoch, &device())
                    .collect::<Result<_, _>>()
                    .unwrap(),
            );
            assert_eq!(got, expected, "{workers} workers, epoch {epoch}");
        }
    }
    // Dropping an iterator early stops its workers (this would hang otherwise).
    let loader = base.clone().num_workers(3).prefetch_factor(1);
    let first = loader.iter::<B>(0, &device()).next().unwrap().unwrap();
    assert_eq!(first.batch_size(), 4);
}

#[test]
fn a_failing_batch_is_an_err_in_order_then_the_end() {
    // Row 5 has no `token_type_ids` while the others have them: batch 2 (rows 4 and 5) fails.
    let rows: Vec<_> = (0..8)
        .map(|i| {
            if i == 5 {
                json!({"input_ids": [i + 1], "token_type_ids": null})
            } else {
                json!({"input_ids": [i + 1], "token_type_ids": [0]})
            }
        })
        .collect();
    let ds = Dataset::from_json_rows(&rows).unwrap();
    for workers in [0, 1, 3] {
        let loader = DataLoader::new(&ds, DataCollatorWithPadding::new(0), 2)
            .unwrap()
            .num_workers(workers);
        let results: Vec<_> = loader.iter::<B>(0, &device()).collect();
        assert_eq!(results.len(), 3, "{workers} workers");
        assert!(results[0].is_ok() && results[1].is_ok());
        assert!(
            matches!(&results[2], Err(DatasetError::Shape(m)) if m.contains("token_type_ids")),
            "{workers} workers: {:?}",
            results[2].as_ref().err()
        );
    }

    // Token labels given to the sequence collator: the very first batch fails.
    let ds = Dataset::from_json_rows(&[
        json!({"input_ids": [1, 2], "labels": [0, 1]}),
        json!({"input_ids": [3], "labels": [1]}),
    ])
    .unwrap();
    let loader = DataLoader::new(&ds, DataCollatorWithPadding::new(0), 1)
        .unwrap()
        .num_workers(2);
    let mut iter = loader.iter::<B>(0, &device());
    assert!(matches!(
        iter.next(),
        Some(Err(DatasetError::InvalidArgument { name: "labels", .. }))
    ));
    assert!(iter.next().is_none());
}

/// A collator that panics on the row with id 13.
struct Panicky;

impl Collator for Panicky {
    fn pad(&self, rows: &[Example]) -> ember_datasets::Result<PaddedBatch> {
        assert!(rows.iter().all(|r| r.input_ids != [13]), "row 13 is cursed");
        DataCollatorWithPadding::new(0).pad(rows)
    }
}

#[test]
fn a_panicking_collator_is_an_err_not_a_panic() {
    let rows: Vec<_> = (10..16).map(|i| json!({"input_ids": [i]})).collect();
    let ds = Dataset::from_json_rows(&rows).unwrap();
    for workers in [0, 2] {
        let loader = DataLoader::new(&ds, Panicky, 2)
            .unwrap()
            .num_workers(workers);
        let results: Vec<_> = loader.iter::<B>(0, &device()).collect();
        assert_eq!(results.len(), 2);
        assert!(results[0].is_ok());
        assert!(
            matches!(&results[1], Err(DatasetError::Shape(m)) if m.contains("cursed")),
            "{:?}",
            results[1].as_ref().err()
        );
    }
    // A boxed collator works as a collator too.
    let boxed: Box<dyn Collator> = Box::new(DataCollatorForLanguageModeling::new(0));
    let loader = DataLoader::new(&ds, boxed, 4).unwrap();
    let batch = loader.iter::<B>(0, &device()).next().unwrap().unwrap();
    assert_eq!(token_labels(&batch), [[10], [11], [12], [13]]);
}

#[test]
fn burn_dataset_and_batcher_traits_serve_burn_train() {
    use burn::data::dataloader::batcher::Batcher;
    use burn::data::dataset::Dataset as BurnDataset;
    let ds = ember_datasets::Dataset::from_json_rows(&[
        serde_json::json!({"input_ids": [101, 7, 102], "label": 1}),
        serde_json::json!({"input_ids": [101, 102], "label": 0}),
    ])
    .unwrap();
    let examples = ember_datasets::ExampleDataset::new(&ds).unwrap();
    assert_eq!(BurnDataset::len(&examples), 2);
    let items: Vec<_> = (0..2)
        .filter_map(|i| BurnDataset::get(&examples, i))
        .collect();
    let batcher = ember_datasets::BurnBatcher(ember_datasets::DataCollatorWithPadding::new(0));
    let batch: ember_datasets::Batch<burn::backend::Flex> =
        Batcher::<burn::backend::Flex, _, _>::batch(&batcher, items, &Default::default()).unwrap();
    assert_eq!(batch.input_ids.dims(), [2, 3]);
}

#[test]
fn distributed_shards_pad_or_drop_as_torchs_distributed_sampler() {
    // torch 2.x `list(DistributedSampler(range(10), num_replicas=3, rank=r, shuffle=False,
    // drop_last=d))` for r in 0..3, and the same over range(2).
    let shards = |n: usize, drop_last: bool, batch: usize| -> Vec<Vec<Vec<usize>>> {
        let ds = classification_rows(n);
        (0..3)
            .map(|rank| {
                DataLoader::new(&ds, DataCollatorWithPadding::new(0), batch)
                    .unwrap()
                    .drop_last(drop_last)
                    .distributed(3, rank)
                    .unwrap()
                    .batch_indices(0)
            })
            .collect()
    };
    let torch_keep = [vec![0, 3, 6, 9], vec![1, 4, 7, 0], vec![2, 5, 8, 1]];
    let torch_drop = [vec![0, 3, 6], vec![1, 4, 7], vec![2, 5, 8]];
    for (rank, rows) in shards(10, false, 100).iter().enumerate() {
        assert_eq!(rows.concat(), torch_keep[rank]);
    }
    for (rank, rows) in shards(10, true, 3).iter().enumerate() {
        assert_eq!(rows.concat(), torch_drop[rank]);
    }
    assert_eq!(
        shards(2, false, 1),
        [vec![vec![0]], vec![vec![1]], vec![vec![0]]]
    );
    // Batches of 2 from the shard of 4 (padded) and of 3 (the short last batch dropped).
    assert_eq!(shards(10, false, 2)[1], [vec![1, 4], vec![7, 0]]);
    assert_eq!(shards(10, true, 2)[1], [vec![1, 4]]);
    let ds = classification_rows(10);
    let loader = DataLoader::new(&ds, DataCollatorWithPadding::new(0), 2).unwrap();
    assert!(loader.clone().distributed(3, 3).is_err());
    assert_eq!(loader.distributed(3, 2).unwrap().len(), 2);
}

#[test]
fn distributed_batches_together_hold_the_single_process_batch() {
    let ds = classification_rows(40);
    let single = DataLoader::new(&ds, DataCollatorWithPadding::new(0), 8)
        .unwrap()
        .shuffle(true)
        .seed(3);
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            DataLoader::new(&ds, DataCollatorWithPadding::new(0), 4)
                .unwrap()
                .shuffle(true)
                .seed(3)
                .distributed(2, rank)
                .unwrap()
        })
        .collect();
    for epoch in 0..2 {
        let whole = single.batch_indices(epoch);
        let (a, b) = (ranks[0].batch_indices(epoch), ranks[1].batch_indices(epoch));
        assert_eq!(whole.len(), a.len());
        for k in 0..whole.len() {
            let mut joined = [a[k].clone(), b[k].clone()].concat();
            let mut expected = whole[k].clone();
            joined.sort_unstable();
            expected.sort_unstable();
            assert_eq!(joined, expected, "epoch {epoch}, batch {k}");
        }
    }
}
