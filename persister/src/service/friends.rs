//! Friend requests and lists. Each change commits both directions in one
//! transaction, then tells both users' connected devices with a `friend`
//! frame and the presence service with a [`FriendChange`]. Those two are
//! live hints on core NATS: a crash between COMMIT and publish loses the
//! hint, never the state (`friends` reads it back).

use chat_shared::ids::UserId;
use chat_shared::presence::FriendChange;
use chat_shared::rpc::{self, RpcError};
use chat_shared::subjects;
use chat_shared::wire::{ErrorCode, FriendState, ServerFrame};
use deadpool_postgres::GenericClient;

use super::{begin, column, corrupt, now_ms, unavailable, Service};

/// Friends and open requests one user may have: the presence fan-out of a
/// user is one pass over this many.
pub(super) const MAX_FRIENDS: i64 = 5000;

fn state_name(state: FriendState) -> &'static str {
    match state {
        FriendState::Friends => "friends",
        FriendState::Requested => "requested",
        FriendState::Pending => "pending",
        FriendState::None => "none",
    }
}

fn parse_state(name: &str) -> Result<FriendState, RpcError> {
    match name {
        "friends" => Ok(FriendState::Friends),
        "requested" => Ok(FriendState::Requested),
        "pending" => Ok(FriendState::Pending),
        _ => Err(corrupt("friend state")),
    }
}

/// The relation after a change, from each side.
struct Change {
    user: UserId,
    other: UserId,
    user_state: FriendState,
    other_state: FriendState,
}

impl Service {
    /// Serializes every change of one pair (both may act at once).
    async fn lock_pair(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        a: &UserId,
        b: &UserId,
    ) -> Result<(), RpcError> {
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[&format!("friends:{low}:{high}")],
        )
        .await
        .map_err(unavailable("lock the friendship"))?;
        Ok(())
    }

    async fn relation(
        &self,
        db: &impl GenericClient,
        user: &UserId,
        other: &UserId,
    ) -> Result<FriendState, RpcError> {
        let row = db
            .query_opt(
                "SELECT state FROM friendships WHERE user_id = $1 AND other = $2",
                &[&user.as_str(), &other.as_str()],
            )
            .await
            .map_err(unavailable("read friendships"))?;
        match row {
            Some(row) => parse_state(column(&row, 0)?),
            None => Ok(FriendState::None),
        }
    }

    async fn set_relation(
        &self,
        db: &impl GenericClient,
        user: &UserId,
        other: &UserId,
        state: FriendState,
    ) -> Result<(), RpcError> {
        db.execute(
            "INSERT INTO friendships (user_id, other, state, since) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (user_id, other) DO UPDATE SET state = EXCLUDED.state, since = EXCLUDED.since",
            &[&user.as_str(), &other.as_str(), &state_name(state), &now_ms()],
        )
        .await
        .map_err(unavailable("upsert friendships"))?;
        Ok(())
    }

    pub(super) async fn friend_request(
        &self,
        request: rpc::FriendRequest,
    ) -> Result<FriendState, RpcError> {
        let rpc::FriendRequest { user, other } = request;
        if user == other {
            return Err(RpcError::new(
                ErrorCode::BadRequest,
                "you cannot befriend yourself",
            ));
        }
        let mut db = self.client().await?;
        let tx = begin(&mut db).await?;
        self.lock_pair(&tx, &user, &other).await?;
        let change = match self.relation(&tx, &user, &other).await? {
            // Asking again changes nothing and tells nobody twice.
            state @ (FriendState::Friends | FriendState::Requested) => return Ok(state),
            // They asked first: asking back is accepting.
            FriendState::Pending => Change {
                user,
                other,
                user_state: FriendState::Friends,
                other_state: FriendState::Friends,
            },
            FriendState::None => {
                // Both sides: requests from many accounts must not grow the
                // other's list (and its `friends` reply) without bound.
                let full = tx
                    .query_one(
                        "SELECT (SELECT count(*) FROM friendships WHERE user_id = $1) >= $3,
                                (SELECT count(*) FROM friendships WHERE user_id = $2) >= $3",
                        &[&user.as_str(), &other.as_str(), &MAX_FRIENDS],
                    )
                    .await
                    .map_err(unavailable("read friendships"))?;
                let (mine_full, theirs_full): (bool, bool) = (column(&full, 0)?, column(&full, 1)?);
                if mine_full || theirs_full {
                    let whose = if mine_full { "you have" } else { "they have" };
                    return Err(RpcError::new(
                        ErrorCode::TooLarge,
                        format!("{whose} {MAX_FRIENDS} friends and requests already"),
                    ));
                }
                Change {
                    user,
                    other,
                    user_state: FriendState::Requested,
                    other_state: FriendState::Pending,
                }
            }
        };
        self.commit_change(tx, &change).await?;
        Ok(change.user_state)
    }

    pub(super) async fn friend_accept(
        &self,
        request: rpc::FriendRequest,
    ) -> Result<FriendState, RpcError> {
        let rpc::FriendRequest { user, other } = request;
        let mut db = self.client().await?;
        let tx = begin(&mut db).await?;
        self.lock_pair(&tx, &user, &other).await?;
        match self.relation(&tx, &user, &other).await? {
            FriendState::Friends => Ok(FriendState::Friends),
            FriendState::Pending => {
                let change = Change {
                    user,
                    other,
                    user_state: FriendState::Friends,
                    other_state: FriendState::Friends,
                };
                self.commit_change(tx, &change).await?;
                Ok(FriendState::Friends)
            }
            FriendState::Requested | FriendState::None => Err(RpcError::new(
                ErrorCode::NotFound,
                "no friend request from this user",
            )),
        }
    }

    pub(super) async fn friend_remove(&self, request: rpc::FriendRequest) -> Result<(), RpcError> {
        let rpc::FriendRequest { user, other } = request;
        let mut db = self.client().await?;
        let tx = begin(&mut db).await?;
        self.lock_pair(&tx, &user, &other).await?;
        let removed = tx
            .execute(
                "DELETE FROM friendships WHERE (user_id = $1 AND other = $2) OR (user_id = $2 AND other = $1)",
                &[&user.as_str(), &other.as_str()],
            )
            .await
            .map_err(unavailable("delete from friendships"))?;
        if removed == 0 {
            return Ok(());
        }
        tx.commit().await.map_err(unavailable("commit"))?;
        let change = Change {
            user,
            other,
            user_state: FriendState::None,
            other_state: FriendState::None,
        };
        self.announce(&change, Vec::new()).await;
        Ok(())
    }

    pub(super) async fn friend_list(
        &self,
        request: rpc::UserRequest,
    ) -> Result<Vec<rpc::FriendEntry>, RpcError> {
        let db = self.client().await?;
        let rows = db
            .query(
                // Friends first and never more than the cap (rows from before
                // the cap on incoming requests included), so the reply fits
                // the transport: 5,000 entries are about 700 KB. v1.1: with
                // what the asker may see of each one's presence.
                "SELECT f.other, f.state,
                        NOT EXISTS (SELECT 1 FROM blocks b
                                    WHERE (b.user_id = $1 AND b.blocked = f.other)
                                       OR (b.user_id = f.other AND b.blocked = $1)),
                        COALESCE(s.last_seen, 'everyone') <> 'nobody'
                 FROM friendships f LEFT JOIN privacy_settings s ON s.user_id = f.other
                 WHERE f.user_id = $1
                 ORDER BY f.state = 'friends' DESC, f.other LIMIT $2",
                &[&request.user.as_str(), &MAX_FRIENDS],
            )
            .await
            .map_err(unavailable("read friendships"))?;
        rows.iter()
            .map(|row| {
                Ok(rpc::FriendEntry {
                    user: UserId::parse(column::<&str>(row, 0)?).map_err(|_| corrupt("friend"))?,
                    state: parse_state(column(row, 1)?)?,
                    presence: column(row, 2)?,
                    last_active: column(row, 3)?,
                })
            })
            .collect()
    }

    /// Accepted friends with no block either way (presence is shared
    /// between them only), and whose `last_seen` shows `last_active`: with
    /// presence going to friends only, `friends` shows it as `everyone`
    /// does, and `nobody` hides it.
    pub(super) async fn friends_of(
        &self,
        request: rpc::UserRequest,
    ) -> Result<rpc::PresenceAudience, RpcError> {
        let db = self.client().await?;
        let own = db
            .query_one(
                "SELECT COALESCE((SELECT last_seen FROM privacy_settings WHERE user_id = $1), 'everyone') <> 'nobody'",
                &[&request.user.as_str()],
            )
            .await
            .map_err(unavailable("read privacy_settings"))?;
        let rows = db
            .query(
                "SELECT f.other, COALESCE(s.last_seen, 'everyone') <> 'nobody'
                 FROM friendships f LEFT JOIN privacy_settings s ON s.user_id = f.other
                 WHERE f.user_id = $1 AND f.state = 'friends'
                   AND NOT EXISTS (SELECT 1 FROM blocks b
                                   WHERE (b.user_id = $1 AND b.blocked = f.other)
                                      OR (b.user_id = f.other AND b.blocked = $1))",
                &[&request.user.as_str()],
            )
            .await
            .map_err(unavailable("read friendships"))?;
        let friends = rows
            .iter()
            .map(|row| {
                Ok(rpc::PresencePeer {
                    user: UserId::parse(column::<&str>(row, 0)?).map_err(|_| corrupt("friend"))?,
                    shows_last_active: column(row, 1)?,
                })
            })
            .collect::<Result<_, RpcError>>()?;
        Ok(rpc::PresenceAudience {
            shows_last_active: column(&own, 0)?,
            friends,
        })
    }

    async fn commit_change(
        &self,
        tx: deadpool_postgres::Transaction<'_>,
        change: &Change,
    ) -> Result<(), RpcError> {
        self.set_relation(&tx, &change.user, &change.other, change.user_state)
            .await?;
        self.set_relation(&tx, &change.other, &change.user, change.other_state)
            .await?;
        let hides_last_active = if change.user_state == FriendState::Friends {
            self.hiding_last_active(&tx, &change.user, &change.other)
                .await?
        } else {
            Vec::new()
        };
        tx.commit().await.map_err(unavailable("commit"))?;
        self.announce(change, hides_last_active).await;
        Ok(())
    }

    /// Tells both sides' devices (the actor's other devices too) and presence.
    async fn announce(&self, change: &Change, hides_last_active: Vec<UserId>) {
        let frames = [
            (&change.user, &change.other, change.user_state),
            (&change.other, &change.user, change.other_state),
        ];
        for (to, about, state) in frames {
            let frame = ServerFrame::Friend {
                user: about.clone(),
                state,
            };
            if let Err(e) = self
                .nats
                .publish(subjects::deliver(to), frame.to_json().into())
                .await
            {
                tracing::warn!(error = %e, "cannot announce a friend change");
            }
        }
        let event = FriendChange {
            users: [change.user.clone(), change.other.clone()],
            friends: change.user_state == FriendState::Friends,
            hides_last_active,
        };
        self.publish_friend_change(&event).await;
    }

    /// Tells presence that these users' friend lists (or what they show
    /// on them) changed.
    pub(super) async fn publish_friend_change(&self, event: &FriendChange) {
        match serde_json::to_vec(event) {
            Ok(body) => {
                if let Err(e) = self
                    .nats
                    .publish(subjects::FRIEND_CHANGES, body.into())
                    .await
                {
                    tracing::warn!(error = %e, "cannot announce a friend change");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a friend change"),
        }
    }
}
