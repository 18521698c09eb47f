-- Delivered watermarks: the newest message of a conversation any device of
-- a user acknowledged (from the edges' delivered receipts, stream
-- RECEIPTS). Read watermarks stay in read_state.
CREATE TABLE delivered_state (
    user_id         TEXT   NOT NULL,
    conversation    TEXT   NOT NULL,
    delivered_up_to BIGINT NOT NULL,
    PRIMARY KEY (user_id, conversation)
);
