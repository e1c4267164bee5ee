//! bf16 copies of weights that hold bf16 values exactly, for decoding.
//!
//! A decoding step reads every weight of the model once, so its speed is the memory's rate
//! divided by the weights' size. Checkpoints published in bf16 (SmolLM2, Llama, most recent
//! models) load into f32 tensors whose low 16 bits are all zero: their bf16 form is the same
//! number in half the bytes, and widening it back is exact. The few-row products
//! ([`crate::linear`] at up to 8 rows) read such weights from a bf16 copy, made once on first
//! use, so they read half the bytes and give bit-identical results. Weights with any other
//! value (f32 checkpoints, weights changed by training) are read as they are.
//!
//! The copies live in a process-wide table keyed by the weight's buffer. An entry holds a weak
//! handle on that buffer: the buffer's header stays allocated, so no other buffer can take its
//! address, and burn, which writes in place only into buffers no other handle (weak or
//! strong) refers to, copies it before any change, so an entry whose handle still upgrades
//! describes the values as they are. Entries of dropped buffers are removed on the next miss.

use burn_flex::FlexTensor;
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// A weight region: its buffer's address, where it starts in the buffer, and its length, in
/// values.
type Key = (usize, usize, usize);

/// The bf16 copy of one weight region, `None` when its values are not all bf16.
struct Entry {
    /// The weight's buffer.
    source: Weak<dyn Any + Send + Sync>,
    packed: Option<Arc<[u16]>>,
}

static TABLE: Mutex<Option<HashMap<Key, Entry>>> = Mutex::new(None);

/// The bf16 copy of the `len` values of `t`'s buffer from its start offset, when every one of
/// them is a bf16 value; made and remembered on first use.
pub(crate) fn bf16_copy(t: &FlexTensor, len: usize) -> Option<Arc<[u16]>> {
    let source: Arc<dyn Any + Send + Sync> = t.data_arc();
    let start = t.layout().start_offset();
    let key = (Arc::as_ptr(&source) as *const u8 as usize, start, len);
    let found = |table: &HashMap<Key, Entry>| {
        table
            .get(&key)
            .filter(|e| e.source.strong_count() > 0)
            .map(|e| e.packed.clone())
    };
    if let Some(packed) = TABLE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(found)
    {
        return packed;
    }
    let values = t.storage::<f32>().get(start..start + len)?;
    let packed: Option<Arc<[u16]>> = if values.iter().all(|v| v.to_bits() & 0xFFFF == 0) {
        Some(values.iter().map(|v| (v.to_bits() >> 16) as u16).collect())
    } else {
        None
    };
    let mut guard = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let table = guard.get_or_insert_with(HashMap::new);
    table.retain(|_, e| e.source.strong_count() > 0);
    let entry = Entry {
        source: Arc::downgrade(&source),
        packed: packed.clone(),
    };
    table.insert(key, entry);
    packed
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn copies_bf16_values_once_and_refuses_others() {
        let exact: Vec<f32> = (0..1000)
            .map(|i| f32::from_bits(((i as u32) * 7919) << 16))
            .collect();
        let t = FlexTensor::from_data(TensorData::new(exact.clone(), [10, 100]));
        let packed = bf16_copy(&t, 1000).expect("bf16 values");
        for (p, v) in packed.iter().zip(&exact) {
            assert_eq!(f32::from_bits(u32::from(*p) << 16).to_bits(), v.to_bits());
        }
        // The same buffer is found again, not copied again.
        assert!(Arc::ptr_eq(&packed, &bf16_copy(&t.clone(), 1000).unwrap()));
        let mut inexact = exact;
        inexact[500] = 1.0 + f32::EPSILON;
        let t = FlexTensor::from_data(TensorData::new(inexact, [10, 100]));
        assert!(bf16_copy(&t, 1000).is_none());
    }
}
