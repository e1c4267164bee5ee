//! The facade glues the crates: a tokenizer batch becomes tensors on the backend the features
//! chose, through `ember::prelude` alone.

use ember::prelude::*;

#[test]
fn prelude_tokenizes_into_tensors_on_the_chosen_backend() {
    let tok = ember::tokenizers::demo::demo_tokenizer().unwrap();
    let opts = EncodeOptions::default().padding(Padding::Longest);
    let batch = tok
        .batch_encode(&["the room was clean", "早餐很好吃"], &opts)
        .unwrap();
    let t: TensorBatch<Backend> = batch.to_tensors(&default_device()).unwrap();
    let [b, s] = t.input_ids.dims();
    assert_eq!(b, 2);
    assert_eq!(s, batch.input_ids()[0].len());
    // The mask counts real tokens on the device: 4 words + 2 specials, 5 characters + 2 specials.
    let counts: Vec<i64> = t
        .attention_mask
        .sum_dim(1)
        .into_data()
        .convert::<i64>()
        .to_vec()
        .unwrap();
    assert_eq!(counts, [6, 7]);
    assert_eq!(ember::backend_name(), "flex");
}
