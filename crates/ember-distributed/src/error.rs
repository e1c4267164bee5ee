//! [`DistributedError`]: what a collective operation reports instead of hanging or panicking.

/// An error of a process group.
#[derive(Debug, thiserror::Error)]
pub enum DistributedError {
    /// Another rank of the group failed (its thread panicked or its process ended) before it
    /// joined the operation: the operation cannot complete.
    #[error("{op}: rank {rank} of the group failed before it joined")]
    RankFailed {
        /// The operation that was waiting (`all_reduce`, `recv`, ...).
        op: &'static str,
        /// The rank that failed.
        rank: usize,
    },
    /// The other ranks did not join the operation within the group's timeout.
    #[error("{op}: the other ranks did not join within {seconds} s (the group's timeout)")]
    Timeout {
        /// The operation that was waiting.
        op: &'static str,
        /// The timeout, in seconds.
        seconds: f64,
    },
    /// An argument no rank could satisfy: a rank out of range, buffers whose lengths differ
    /// between ranks, a length not divisible by the group size.
    #[error("{op}: {message}")]
    InvalidArgument {
        /// The operation.
        op: &'static str,
        /// What is wrong, naming the value.
        message: String,
    },
    /// MPI could not be set up (already initialised, too low a thread level) or refused an
    /// operation.
    #[error("MPI: {0}")]
    Mpi(String),
    /// A gradient or parameter that could not be read or written (a dtype other than float).
    #[error("{0}")]
    Tensor(String),
    /// A pipeline stage's own forward pass failed (a model rejected its micro-batch): which
    /// stage, and the stage's error, kept whole so that callers can downcast it.
    #[error("pipeline stage {stage}: {source}")]
    Stage {
        /// The stage (rank in the pipeline group) whose forward pass failed.
        stage: usize,
        /// The error the stage returned.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

/// `Result` with [`DistributedError`].
pub type Result<T> = std::result::Result<T, DistributedError>;
