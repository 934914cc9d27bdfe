-- Switchboard SQL sink, PostgreSQL 12+: migration 0001 (the initial tables).
--
-- Applied by the sync worker at start (inside one transaction, under an advisory lock) when
-- `switchboard_schema` has no row for version 1; ops may also run it by hand:
--   psql "$URL" -v ON_ERROR_STOP=1 -1 -f schema/postgres/0001_init.sql
-- Every table lands in the first schema of the connection's search_path.
-- The SQL Server twin is schema/mssql/0001_init.sql (same tables, columns and meaning).
-- Times are timestamptz (UTC) made from the event `ts` (Unix ms); `off` is the log offset.

CREATE TABLE IF NOT EXISTS switchboard_schema (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per `message` event.
CREATE TABLE IF NOT EXISTS messages (
    off      bigint      PRIMARY KEY,
    conv     text        NOT NULL,           -- dm:<a>:<b> or room:<id>
    seq      bigint      NOT NULL,           -- per-conversation sequence, from 1
    sender   text        NOT NULL,           -- user id (`from`)
    device   text        NULL,               -- sending device; NULL for HTTP API publishes
    cid      text        NULL,               -- client id of the send (dedupe key)
    body     jsonb       NOT NULL,
    sent_at  timestamptz NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_conv_seq ON messages (conv, seq);
CREATE INDEX IF NOT EXISTS messages_sender_sent_at ON messages (sender, sent_at);

-- The latest receipt per (conversation, user, kind); seq only moves forward.
CREATE TABLE IF NOT EXISTS receipts (
    conv    text        NOT NULL,
    "user"  text        NOT NULL,
    kind    text        NOT NULL CHECK (kind IN ('delivered', 'read')),
    seq     bigint      NOT NULL,
    at      timestamptz NOT NULL,
    off     bigint      NOT NULL,            -- the receipt event that set this row
    PRIMARY KEY (conv, "user", kind)
);

-- Rooms (from room.created / room.member) and direct conversations (from their messages).
CREATE TABLE IF NOT EXISTS conversations (
    id           text        PRIMARY KEY,
    kind         text        NOT NULL CHECK (kind IN ('dm', 'room')),
    name         text        NULL,           -- rooms only
    members      jsonb       NOT NULL DEFAULT '[]',  -- JSON array of user ids, sorted
    members_off  bigint      NOT NULL DEFAULT 0,     -- last room event applied to members
    created_at   timestamptz NULL,           -- room.created, or the first message of a dm
    last_seq     bigint      NOT NULL DEFAULT 0,
    last_at      timestamptz NULL,
    last_off     bigint      NOT NULL DEFAULT 0
);

-- Every `presence` event (public view and, for invisible users, their own view).
CREATE TABLE IF NOT EXISTS presence_log (
    off      bigint      PRIMARY KEY,
    "user"   text        NOT NULL,
    status   text        NOT NULL,           -- online | away | busy | invisible | offline
    devices  integer     NOT NULL,
    scope    text        NOT NULL DEFAULT 'public',  -- public | self
    at       timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS presence_log_user_at ON presence_log ("user", at);

-- One row per call (call.invite, then call.accepted / call.ended): what billing reads.
CREATE TABLE IF NOT EXISTS calls (
    id           text        PRIMARY KEY,
    initiator    text        NOT NULL,
    device       text        NOT NULL,       -- the initiator's device
    media        text        NOT NULL CHECK (media IN ('audio', 'video')),
    invited      jsonb       NOT NULL,       -- JSON array of invited user ids
    started_at   timestamptz NOT NULL,       -- the invite
    answered_at  timestamptz NULL,           -- first call.accepted
    answered_by  text        NULL,
    ended_at     timestamptz NULL,
    end_reason   text        NULL,           -- hangup | rejected | no_answer | busy | time_limit
    ended_by     text        NULL,           -- who hung up (hangup only)
    duration_ms  bigint      NULL,           -- talk time as the broker measured it
    invite_off   bigint      NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_initiator_started ON calls (initiator, started_at);

-- Every `notice` event (backend notices to one user).
CREATE TABLE IF NOT EXISTS notices (
    off     bigint      PRIMARY KEY,
    "user"  text        NOT NULL,
    type    text        NOT NULL,
    data    jsonb       NOT NULL,
    at      timestamptz NOT NULL
);

-- How far each sink got: written in the same transaction as the rows.
CREATE TABLE IF NOT EXISTS sync_checkpoint (
    sink        text        PRIMARY KEY,
    off         bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO switchboard_schema (version, name) VALUES (1, 'init') ON CONFLICT (version) DO NOTHING;
