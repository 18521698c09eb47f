//! The chain of live deliveries (`Chat-Prev-Cursor`): the router writes it
//! on every live inbox item, edges read it to notice a lost one.

use async_nats::HeaderMap;

use crate::ids::Cursor;
use crate::subjects::{PREV_CURSOR_HEADER, PREV_CURSOR_UNKNOWN};

/// What a live delivery says about the user's inbox item before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous {
    /// The item at this cursor.
    At(Cursor),
    /// Unknown: an append for the user failed since the last delivery, and
    /// may be stored anyway.
    Unknown,
    /// Nothing said (the router just started, the item was delivered
    /// before, or this is not a live inbox item).
    Unstated,
}

impl Previous {
    pub fn add_to(self, headers: &mut HeaderMap) {
        match self {
            Self::At(cursor) => headers.insert(PREV_CURSOR_HEADER, cursor.to_string().as_str()),
            Self::Unknown => headers.insert(PREV_CURSOR_HEADER, PREV_CURSOR_UNKNOWN),
            Self::Unstated => {}
        }
    }

    pub fn from_headers(headers: Option<&HeaderMap>) -> Self {
        match headers
            .and_then(|h| h.get(PREV_CURSOR_HEADER))
            .map(|v| v.as_str())
        {
            Some(PREV_CURSOR_UNKNOWN) => Self::Unknown,
            Some(value) => Cursor::parse(value).map_or(Self::Unstated, Self::At),
            None => Self::Unstated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_link_survives_the_headers() {
        for previous in [
            Previous::At(Cursor(42)),
            Previous::Unknown,
            Previous::Unstated,
        ] {
            let mut headers = HeaderMap::new();
            previous.add_to(&mut headers);
            assert_eq!(Previous::from_headers(Some(&headers)), previous);
        }
        let mut garbage = HeaderMap::new();
        garbage.insert(PREV_CURSOR_HEADER, "x.y");
        assert_eq!(Previous::from_headers(Some(&garbage)), Previous::Unstated);
        assert_eq!(Previous::from_headers(None), Previous::Unstated);
    }
}
