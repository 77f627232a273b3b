//! keepfs: a FUSE filesystem that gives containers a POSIX view of an S3 bucket.
//!
//! Data flows one way: [`cli`]/[`config`] → [`fs`] (the FUSE adapter: requests in, replies out)
//! → [`vfs`] (operations and open-file handles) → [`namespace`] (paths, inodes, attributes),
//! [`cache`] (memory blocks, cache directory, journal), [`prefetch`] (reads) and [`write`](mod@write)
//! (dirty files, uploads) → [`store`] (S3).

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cache;
pub mod cli;
pub mod config;
pub mod control;
pub mod error;
pub mod flush;
pub mod fs;
pub mod helper;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod mount;
pub mod namespace;
pub mod prefetch;
pub mod snapshot;
pub mod status;
pub mod store;
pub mod vfs;
pub mod write;
