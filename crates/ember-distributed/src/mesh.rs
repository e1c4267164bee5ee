//! [`DeviceMesh`]: the ranks of a job arranged as `data × pipeline × tensor` parallel, with a
//! process group along each axis (Megatron-LM's `parallel_state`).
//!
//! Ranks are numbered tensor-parallel fastest, then data parallel, then pipeline stage:
//!
//! ```text
//! rank = tp_rank + tp · (dp_rank + dp · pp_rank)
//! ```
//!
//! so that the ranks of one tensor-parallel group, which exchange activations in every layer,
//! are neighbours (one machine, under `mpirun`'s default placement), and a pipeline stage's
//! data-parallel replicas are next. The seed's picture, 2 × 4 × 4 = 32 ranks: 32 layers in 4
//! stages of 8, each stage split 4 ways, the whole twice.

use crate::error::{DistributedError, Result};
use crate::group::ProcessGroup;
use std::sync::Arc;

/// One rank's place in a `dp × pp × tp` mesh and its three groups.
#[derive(Clone)]
pub struct DeviceMesh {
    world: Arc<dyn ProcessGroup>,
    shape: MeshShape,
    coords: MeshCoords,
    data: Arc<dyn ProcessGroup>,
    pipeline: Arc<dyn ProcessGroup>,
    tensor: Arc<dyn ProcessGroup>,
}

/// The sizes of a mesh's three axes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshShape {
    /// Data-parallel replicas.
    pub data: usize,
    /// Pipeline stages.
    pub pipeline: usize,
    /// Tensor-parallel slices.
    pub tensor: usize,
}

/// A rank's index along each axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshCoords {
    /// Which data-parallel replica.
    pub data: usize,
    /// Which pipeline stage.
    pub pipeline: usize,
    /// Which tensor-parallel slice.
    pub tensor: usize,
}

impl std::fmt::Debug for DeviceMesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMesh")
            .field("rank", &self.world.rank())
            .field("shape", &self.shape)
            .field("coords", &self.coords)
            .finish()
    }
}

impl MeshShape {
    /// The rank at `coords`.
    pub fn rank_of(&self, coords: MeshCoords) -> usize {
        coords.tensor + self.tensor * (coords.data + self.data * coords.pipeline)
    }

    /// The coordinates of `rank`.
    pub fn coords_of(&self, rank: usize) -> MeshCoords {
        MeshCoords {
            tensor: rank % self.tensor,
            data: rank / self.tensor % self.data,
            pipeline: rank / (self.tensor * self.data),
        }
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.data * self.pipeline * self.tensor
    }
}

impl DeviceMesh {
    /// Arranges the ranks of `world` as `data × pipeline × tensor` (whose product must be the
    /// world's size) and splits the world into the three groups this rank belongs to. Every
    /// rank of `world` calls it with the same shape.
    pub fn new(
        world: Arc<dyn ProcessGroup>,
        data: usize,
        pipeline: usize,
        tensor: usize,
    ) -> Result<Self> {
        let shape = MeshShape {
            data,
            pipeline,
            tensor,
        };
        if data == 0 || pipeline == 0 || tensor == 0 || shape.size() != world.size() {
            return Err(DistributedError::InvalidArgument {
                op: "device_mesh",
                message: format!(
                    "a mesh of {data} (data) × {pipeline} (pipeline) × {tensor} (tensor) ranks \
                     does not fit a world of {} ranks",
                    world.size()
                ),
            });
        }
        let c = shape.coords_of(world.rank());
        // Each split's colour names the group (the other two coordinates), its key orders the
        // ranks in it (the coordinate along the axis). Every rank makes the three splits in
        // the same order, as `Comm_split` requires.
        let tensor_group = world.split(c.data + data * c.pipeline, c.tensor)?;
        let data_group = world.split(c.tensor + tensor * c.pipeline, c.data)?;
        let pipeline_group = world.split(c.tensor + tensor * c.data, c.pipeline)?;
        Ok(Self {
            world,
            shape,
            coords: c,
            data: data_group,
            pipeline: pipeline_group,
            tensor: tensor_group,
        })
    }

    /// The whole job.
    pub fn world(&self) -> &Arc<dyn ProcessGroup> {
        &self.world
    }

    /// The sizes of the axes.
    pub fn shape(&self) -> MeshShape {
        self.shape
    }

    /// This rank's coordinates.
    pub fn coords(&self) -> MeshCoords {
        self.coords
    }

    /// The ranks holding the same stage and slice of the other replicas: gradients are
    /// averaged over this group ([`crate::DataParallel`]).
    pub fn data_group(&self) -> &Arc<dyn ProcessGroup> {
        &self.data
    }

    /// The ranks holding the other stages of this replica's same slice: activations and
    /// their gradients pass along this group ([`crate::PipelineParallel`]).
    pub fn pipeline_group(&self) -> &Arc<dyn ProcessGroup> {
        &self.pipeline
    }

    /// The ranks holding the other slices of this stage: a layer's partial results are summed
    /// over this group ([`crate::TensorParallel`]).
    pub fn tensor_group(&self) -> &Arc<dyn ProcessGroup> {
        &self.tensor
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ThreadGroup;

    /// Every group holds the ranks that share the other two coordinates, ordered along its
    /// axis, in Megatron's numbering (tensor fastest, then data, then pipeline).
    #[test]
    fn groups_hold_the_ranks_along_each_axis() {
        let shape = MeshShape {
            data: 2,
            pipeline: 2,
            tensor: 2,
        };
        let members = ThreadGroup::run(8, |world| {
            let rank = world.rank() as f32;
            let mesh = DeviceMesh::new(Arc::new(world), 2, 2, 2).unwrap();
            let members = |g: &Arc<dyn ProcessGroup>| g.all_gather(&[rank]).unwrap();
            (
                mesh.coords(),
                members(mesh.tensor_group()),
                members(mesh.data_group()),
                members(mesh.pipeline_group()),
            )
        });
        for (rank, (coords, tensor, data, pipeline)) in members.into_iter().enumerate() {
            assert_eq!(coords, shape.coords_of(rank));
            assert_eq!(shape.rank_of(coords), rank);
            let along = |f: &dyn Fn(usize) -> MeshCoords| -> Vec<f32> {
                (0..2).map(|i| shape.rank_of(f(i)) as f32).collect()
            };
            assert_eq!(
                tensor,
                along(&|i| MeshCoords {
                    tensor: i,
                    ..coords
                })
            );
            assert_eq!(data, along(&|i| MeshCoords { data: i, ..coords }));
            assert_eq!(
                pipeline,
                along(&|i| MeshCoords {
                    pipeline: i,
                    ..coords
                })
            );
        }
        // Rank 5 = tensor 1 + 2 · (data 0 + 2 · pipeline 1).
        assert_eq!(
            shape.coords_of(5),
            MeshCoords {
                data: 0,
                pipeline: 1,
                tensor: 1
            }
        );
    }

    /// A shape that does not multiply to the world's size is an error naming both.
    #[test]
    fn a_shape_that_does_not_fit_is_an_error() {
        let errors = ThreadGroup::run(4, |world| {
            DeviceMesh::new(Arc::new(world), 2, 2, 2)
                .unwrap_err()
                .to_string()
        });
        assert!(
            errors[0].contains("does not fit a world of 4 ranks"),
            "{}",
            errors[0]
        );
    }
}
