//! The one error type of the crate.
//!
//! Every variant names the tensor, field or parameter at fault and the offending value, so that a
//! bad checkpoint or a wrong call says what to fix without a debugger. Nothing in this crate
//! panics on bad input: lengths, shapes and blocksizes are checked up front.

/// What went wrong in a quantization or dequantization call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// A blocksize that bitsandbytes does not accept for this operation.
    #[error("{op}: blocksize {blocksize} is not supported (expected {expected})")]
    InvalidBlocksize {
        /// The operation, e.g. `quantize_4bit`.
        op: &'static str,
        /// The blocksize that was given.
        blocksize: usize,
        /// The accepted values, in words.
        expected: &'static str,
    },

    /// A tensor whose number of elements does not fit the others.
    #[error("`{tensor}` has {actual} elements, expected {expected}")]
    LengthMismatch {
        /// The tensor or field, e.g. `absmax` or `bias`.
        tensor: &'static str,
        /// The number of elements the other arguments imply.
        expected: usize,
        /// The number of elements it has.
        actual: usize,
    },

    /// A shape that cannot be used here (wrong rank, or a size that overflows `usize`).
    #[error("`{tensor}` has shape {shape:?}: {reason}")]
    InvalidShape {
        /// The tensor whose shape is wrong.
        tensor: &'static str,
        /// The shape that was given.
        shape: Vec<usize>,
        /// Why it cannot be used.
        reason: &'static str,
    },

    /// An empty input where the operation needs at least one value.
    #[error("`{tensor}` is empty: {op} needs at least one value")]
    Empty {
        /// The empty tensor.
        tensor: &'static str,
        /// The operation that needs values.
        op: &'static str,
    },

    /// `create_dynamic_map` parameters that do not make `2^total_bits` values (bitsandbytes
    /// asserts the same).
    #[error(
        "create_dynamic_map(signed={signed}, max_exponent_bits={max_exponent_bits}, \
         total_bits={total_bits}) makes {values} values, not 2^total_bits = {expected}"
    )]
    InvalidDynamicMap {
        /// `signed` as given.
        signed: bool,
        /// `max_exponent_bits` as given.
        max_exponent_bits: u32,
        /// `total_bits` as given.
        total_bits: u32,
        /// How many values the parameters make.
        values: usize,
        /// `2^total_bits` (capped at 256 entries of the table).
        expected: usize,
    },

    /// A 4-bit quant type name other than `nf4` / `fp4`.
    #[error("unknown 4-bit quant_type {0:?} (expected \"nf4\" or \"fp4\")")]
    UnknownQuantType(String),

    /// A `bnb_4bit_compute_dtype` other than float32 / bfloat16.
    #[error("unknown bnb_4bit_compute_dtype {0:?} (expected \"float32\" or \"bfloat16\")")]
    UnknownComputeDtype(String),
}

/// `Result` with [`QuantError`].
pub type Result<T, E = QuantError> = std::result::Result<T, E>;

/// The number of elements of `shape`, or [`QuantError::InvalidShape`] if it overflows.
pub(crate) fn numel(tensor: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| QuantError::InvalidShape {
            tensor,
            shape: shape.to_vec(),
            reason: "the number of elements overflows usize",
        })
}

/// [`QuantError::LengthMismatch`] unless `actual == expected`.
pub(crate) fn check_len(tensor: &'static str, expected: usize, actual: usize) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(QuantError::LengthMismatch {
            tensor,
            expected,
            actual,
        })
    }
}
