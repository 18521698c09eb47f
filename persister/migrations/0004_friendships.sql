-- Friendships, one row per user and direction: (alice, bob, 'requested')
-- goes with (bob, alice, 'pending'); accepted, both rows say 'friends'.
-- Two rows make "alice's list" one index range scan.
CREATE TABLE friendships (
    user_id TEXT   NOT NULL,
    other   TEXT   NOT NULL,
    state   TEXT   NOT NULL CHECK (state IN ('friends', 'requested', 'pending')),
    since   BIGINT NOT NULL,
    PRIMARY KEY (user_id, other)
);
