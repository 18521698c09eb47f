//! The JetStream Object Store as media uses it.

use async_nats::jetstream::object_store::{InfoError, InfoErrorKind, ObjectInfo, ObjectStore};

/// The object `name` if it is there: a deleted object leaves a record
/// behind (`deleted`), which counts as no object.
pub async fn live(store: &ObjectStore, name: &str) -> Result<Option<ObjectInfo>, InfoError> {
    match store.info(name).await {
        Ok(info) if !info.deleted => Ok(Some(info)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == InfoErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}
