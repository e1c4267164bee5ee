//! Distributed training for burn.
//!
//! This crate will hold process groups, data / tensor / pipeline parallelism, the 3D device mesh
//! and the launcher. It is filled by a later milestone and exports nothing yet.
