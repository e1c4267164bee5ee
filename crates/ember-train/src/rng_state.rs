//! The random state of a [`Trainer`](crate::Trainer) checkpoint: HF's `rng_state.pth` (one
//! process) or `rng_state_{rank}.pth` (each rank of a data-parallel run), here JSON.
//!
//! burn cannot read a generator's state back, so the Trainer reseeds the backend's generator
//! before every training batch from a seed, the batch's position in the run and the rank
//! ([`dropout_seed`]). That triple is the whole state: the file holds the seed and the position
//! of the next batch, and a resumed run that reseeds from them draws the masks an
//! uninterrupted run draws.

use crate::error::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The name of a Trainer checkpoint's random-state file for rank `process_index` of
/// `num_processes`: `rng_state.json` for one process, `rng_state_{rank}.json` for each rank of
/// a data-parallel run (HF's `rng_state.pth` / `rng_state_{rank}.pth`).
pub fn rng_state_file(process_index: usize, num_processes: usize) -> String {
    if num_processes > 1 {
        format!("rng_state_{process_index}.json")
    } else {
        "rng_state.json".to_owned()
    }
}

/// The seed the backend's generator takes before the batch at `position` in the run (epoch ·
/// batches per epoch + batch) on rank `rank`: a function of the place, not of a running count,
/// so that a resumed run seeds each batch as an uninterrupted one did; the rank enters so that
/// ranks draw different dropout masks (as torch's per-process generators do).
pub(crate) fn dropout_seed(seed: u64, position: usize, rank: usize) -> u64 {
    seed.wrapping_mul(1_000_003)
        .wrapping_add(position as u64)
        .wrapping_add((rank as u64) << 40)
}

/// One rank's random state as a checkpoint stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RngState {
    /// The seed of [`dropout_seed`] (`args.seed` of the run that started the training).
    pub seed: u64,
    /// The optimizer steps taken when the checkpoint was written.
    pub global_step: usize,
    /// The rank that wrote it (0 for one process).
    #[serde(default)]
    pub process_index: usize,
    /// The ranks of the run that wrote it.
    #[serde(default = "one")]
    pub num_processes: usize,
    /// The position in the run of the next training batch: where the generator's stream
    /// continues. Absent in checkpoints of older Ember, which held the seed only.
    #[serde(default)]
    pub next_batch: Option<usize>,
}

fn one() -> usize {
    1
}

impl RngState {
    /// The state as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("the random state serializes")
    }

    /// Reads rank `process_index`'s file of `checkpoint`.
    ///
    /// Errors: [`TrainError::Io`] naming the file when it is missing or unreadable,
    /// [`TrainError::File`] naming it when it is not such a state or another rank's.
    pub fn read(checkpoint: &Path, process_index: usize, num_processes: usize) -> Result<Self> {
        let path = checkpoint.join(rng_state_file(process_index, num_processes));
        let bytes = std::fs::read(&path).map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })?;
        let state: Self = serde_json::from_slice(&bytes).map_err(|e| TrainError::File {
            path: path.clone(),
            message: format!("not a random state: {e}"),
        })?;
        if state.process_index != process_index {
            return Err(TrainError::File {
                path,
                message: format!(
                    "written by rank {} of {}, read by rank {process_index} of {num_processes}",
                    state.process_index, state.num_processes
                ),
            });
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_hf_and_ranks_draw_apart() {
        assert_eq!(rng_state_file(0, 1), "rng_state.json");
        assert_eq!(rng_state_file(1, 2), "rng_state_1.json");
        assert_ne!(dropout_seed(7, 3, 0), dropout_seed(7, 3, 1));
        assert_ne!(dropout_seed(7, 3, 0), dropout_seed(7, 4, 0));
    }

    #[test]
    fn missing_corrupt_or_foreign_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let e = RngState::read(dir.path(), 1, 2).unwrap_err();
        assert!(
            matches!(&e, TrainError::Io { path, .. } if path.ends_with("rng_state_1.json")),
            "{e}"
        );
        std::fs::write(dir.path().join("rng_state_1.json"), b"{\"seed\": 7, ").unwrap();
        let e = RngState::read(dir.path(), 1, 2).unwrap_err();
        assert!(
            matches!(&e, TrainError::File { path, .. } if path.ends_with("rng_state_1.json")),
            "{e}"
        );
        let rank0 = RngState {
            seed: 7,
            global_step: 5,
            process_index: 0,
            num_processes: 2,
            next_batch: Some(10),
        };
        std::fs::write(dir.path().join("rng_state_1.json"), rank0.to_json()).unwrap();
        let e = RngState::read(dir.path(), 1, 2).unwrap_err();
        assert!(e.to_string().contains("written by rank 0"), "{e}");
        // An older Ember's file: the seed and the step only.
        std::fs::write(
            dir.path().join("rng_state.json"),
            br#"{"seed": 7, "global_step": 5}"#,
        )
        .unwrap();
        let old = RngState::read(dir.path(), 0, 1).unwrap();
        assert_eq!((old.seed, old.next_batch, old.num_processes), (7, None, 1));
    }
}
