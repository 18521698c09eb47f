//! `profile.set` and `profiles`: a user's display name and avatar. The
//! avatar is a media id: an image the user uploaded (`POST /v1/media`).

use chat_shared::rpc::{self, RpcError};
use chat_shared::wire::{ErrorCode, Profile, MAX_PROFILE_USERS};

use super::{column, corrupt, now_ms, unavailable, Service};
use chat_shared::ids::{MediaId, UserId};

const MAX_NAME_CHARS: usize = 64;

/// Why a profile is refused; each is `bad_request`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum ProfileError {
    #[error("name must be 1..={MAX_NAME_CHARS} characters, not only spaces")]
    NameLength,
    #[error("name must not contain control characters")]
    NameControl,
    #[error("avatar must be a media id (64 lowercase hex digits)")]
    Avatar,
    #[error("avatar must be an image you uploaded")]
    NotYourImage,
    #[error("at most {MAX_PROFILE_USERS} users")]
    TooManyUsers,
}

impl From<ProfileError> for RpcError {
    fn from(e: ProfileError) -> Self {
        RpcError::new(ErrorCode::BadRequest, e.to_string())
    }
}

fn check_name(name: &str) -> Result<(), ProfileError> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS || name.trim().is_empty() {
        return Err(ProfileError::NameLength);
    }
    if name.chars().any(char::is_control) {
        return Err(ProfileError::NameControl);
    }
    Ok(())
}

/// A media id's shape: what can sit in a URL path and an HTML attribute
/// as it is.
fn check_avatar(avatar: &str) -> Result<MediaId, ProfileError> {
    MediaId::parse(avatar).map_err(|_| ProfileError::Avatar)
}

impl Service {
    pub(super) async fn profile_set(
        &self,
        request: rpc::ProfileSetRequest,
    ) -> Result<(), RpcError> {
        check_name(&request.name)?;
        let avatar = request.avatar.as_deref().map(check_avatar).transpose()?;
        let db = self.client().await?;
        if let Some(avatar) = avatar {
            if !self.uploaded_image(&db, &request.user, &avatar).await? {
                return Err(ProfileError::NotYourImage.into());
            }
        }
        db.execute(
            "INSERT INTO profiles (user_id, name, avatar, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (user_id)
             DO UPDATE SET name = EXCLUDED.name, avatar = EXCLUDED.avatar,
                           updated_at = EXCLUDED.updated_at",
            &[
                &request.user.as_str(),
                &request.name,
                &request.avatar,
                &now_ms(),
            ],
        )
        .await
        .map_err(unavailable("upsert a profile"))?;
        Ok(())
    }

    /// The profiles of those of `users` who set one, in the order asked.
    pub(super) async fn profiles(
        &self,
        request: rpc::ProfilesRequest,
    ) -> Result<Vec<Profile>, RpcError> {
        if request.users.len() > MAX_PROFILE_USERS {
            return Err(ProfileError::TooManyUsers.into());
        }
        let users: Vec<&str> = request.users.iter().map(UserId::as_str).collect();
        let db = self.client().await?;
        let rows = db
            .query(
                "SELECT p.user_id, p.name, p.avatar
                 FROM unnest($1::text[]) WITH ORDINALITY AS asked (user_id, n)
                 JOIN profiles p ON p.user_id = asked.user_id
                 ORDER BY asked.n",
                &[&users],
            )
            .await
            .map_err(unavailable("read profiles"))?;
        let mut items: Vec<Profile> = Vec::with_capacity(rows.len());
        for row in &rows {
            let user = UserId::parse(column::<String>(row, 0)?).map_err(|_| corrupt("profile"))?;
            // A user named twice is answered once.
            if items.iter().any(|p| p.user == user) {
                continue;
            }
            items.push(Profile {
                user,
                name: column(row, 1)?,
                avatar: column(row, 2)?,
            });
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_avatars_of_the_wrong_shape_are_refused() {
        assert_eq!(check_name("Анна 🌸"), Ok(()));
        assert_eq!(check_name(&"名".repeat(64)), Ok(()));
        assert_eq!(check_name(&"名".repeat(65)), Err(ProfileError::NameLength));
        assert_eq!(check_name(""), Err(ProfileError::NameLength));
        assert_eq!(check_name("   "), Err(ProfileError::NameLength));
        assert_eq!(check_name("a\nb"), Err(ProfileError::NameControl));
        assert!(check_avatar(&"0a".repeat(32)).is_ok());
        for bad in ["", "../x", "a b", "<img>", "m_01HZX-abc", &"a".repeat(65)] {
            assert_eq!(check_avatar(bad), Err(ProfileError::Avatar), "{bad}");
        }
    }
}
