//! What a server does with conditional writes, asked once per mount.
//!
//! AWS S3 refuses a PutObject whose `If-None-Match: *` or `If-Match` does not hold with
//! 412 Precondition Failed (S3 API reference, PutObject, "conditional writes"); some
//! S3-compatible servers ignore both headers and overwrite (Garage 2.5). Where the server
//! honours them, an upload's precondition alone guards the key, and the HEAD keepfs otherwise
//! sends just before the write to find another client's change is not needed.

use std::collections::HashMap;

use bytes::Bytes;

use super::{ObjectStore, Precondition, StoreError};

/// Whether `store` refuses both kinds of failed precondition on PutObject, tried on a key of
/// keepfs's own under `reserved` (`PREFIX/.keepfs/`); the key is deleted afterwards. Four
/// requests. Any error (no write permission, a server that can't be reached) answers `false`:
/// keepfs then keeps checking with HEAD, which is correct on every server.
pub async fn honours_conditional_puts<S: ObjectStore>(store: &S, reserved: &str) -> bool {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let key = format!("{reserved}probe/{}-{nanos}", std::process::id());
    let put = |precondition: Precondition| {
        let key = key.clone();
        async move {
            store
                .put_object(
                    &key,
                    Bytes::from_static(b"probe"),
                    &HashMap::new(),
                    &precondition,
                )
                .await
        }
    };
    let verdict = match put(Precondition::None).await {
        Ok(_) => {
            let absent = put(Precondition::Absent).await;
            let matches = put(Precondition::Matches("\"0-no-such-version\"".to_owned())).await;
            matches!(absent, Err(StoreError::PreconditionFailed))
                && matches!(matches, Err(StoreError::PreconditionFailed))
        }
        Err(_) => return false,
    };
    if let Err(e) = store.delete(&key).await {
        tracing::debug!(key, error = %e, "could not delete the conditional-write probe");
    }
    verdict
}
