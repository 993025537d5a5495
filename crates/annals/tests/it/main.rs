//! Integration tests of the core crate: the model check of the partition
//! lease protocol.

mod partition_model;
