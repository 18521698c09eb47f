//! Group members as the router sees them: the newest membership event wins,
//! the persister answers on a miss.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chat_shared::ids::{GroupId, UserId};
use chat_shared::rpc::{self, RpcError};

pub struct Members {
    nats: async_nats::Client,
    groups: Mutex<HashMap<GroupId, Arc<Vec<UserId>>>>,
}

impl Members {
    pub fn new(nats: async_nats::Client) -> Self {
        Self {
            nats,
            groups: Mutex::new(HashMap::new()),
        }
    }

    pub async fn of(&self, group: &GroupId) -> Result<Arc<Vec<UserId>>, RpcError> {
        if let Some(members) = self.groups.lock().ok().and_then(|g| g.get(group).cloned()) {
            return Ok(members);
        }
        let members = Arc::new(
            rpc::call::<rpc::Members>(
                &self.nats,
                &rpc::MembersRequest {
                    group: group.clone(),
                },
            )
            .await?,
        );
        if let Ok(mut groups) = self.groups.lock() {
            groups
                .entry(group.clone())
                .or_insert_with(|| members.clone());
        }
        Ok(members)
    }

    /// Records the members after a change (from the EVENTS stream).
    pub fn set(&self, group: GroupId, members: Vec<UserId>) {
        if let Ok(mut groups) = self.groups.lock() {
            groups.insert(group, Arc::new(members));
        }
    }
}
