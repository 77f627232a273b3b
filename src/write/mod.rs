//! Writing: dirty files in the cache directory, and their upload to S3.

pub mod barrier;
pub mod dirty;
pub mod local;
pub mod renames;
pub mod resume;
pub mod tombstones;
pub mod upload;

pub use barrier::WriteBarrier;
pub use dirty::{DirtyAttr, DirtyFiles, FileId};
pub use local::{Coverage, LocalData};
pub use upload::{UploadConfig, UploadFailure, UploadStats, Uploader};
