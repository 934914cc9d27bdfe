-- Switchboard SQL sink, SQL Server 2019+ (T-SQL): migration 0001 (the initial tables).
--
-- The twin of schema/postgres/0001_init.sql, reviewed line by line against it; the same
-- tables, columns and meaning. Differences, on purpose:
--   * text           -> NVARCHAR(n) (keys need a bounded length: ids are short) or NVARCHAR(MAX);
--   * jsonb          -> NVARCHAR(MAX) with CHECK (ISJSON(col) = 1) (SQL Server 2016+ JSON functions);
--   * timestamptz    -> DATETIME2(3), always UTC (the event ts, Unix ms);
--   * "user", off    -> [user], [off] (reserved words in T-SQL);
--   * IF NOT EXISTS  -> IF OBJECT_ID(...) IS NULL / IF NOT EXISTS (SELECT ... sys.indexes);
--   * ON CONFLICT    -> the worker uses INSERT ... WHERE NOT EXISTS and UPDATE ... JOIN
--                       (no MERGE) inside its transaction;
--   * batches are separated by GO lines (sqlcmd / SSMS); the worker splits on them too.
-- Applied by the sync worker at start (one transaction, sp_getapplock) when
-- switchboard_schema has no row for version 1; by hand:
--   sqlcmd -S <server> -d <database> -b -i schema/mssql/0001_init.sql

IF OBJECT_ID(N'switchboard_schema', N'U') IS NULL
CREATE TABLE switchboard_schema (
    version     INT            NOT NULL PRIMARY KEY,
    name        NVARCHAR(200)  NOT NULL,
    applied_at  DATETIME2(3)   NOT NULL DEFAULT SYSUTCDATETIME()
);
GO

-- One row per `message` event.
IF OBJECT_ID(N'messages', N'U') IS NULL
CREATE TABLE messages (
    [off]    BIGINT         NOT NULL PRIMARY KEY,
    conv     NVARCHAR(450)  NOT NULL,       -- dm:<a>:<b> or room:<id>
    seq      BIGINT         NOT NULL,       -- per-conversation sequence, from 1
    sender   NVARCHAR(256)  NOT NULL,       -- user id (`from`)
    device   NVARCHAR(256)  NULL,           -- NULL for HTTP API publishes
    cid      NVARCHAR(256)  NULL,           -- client id of the send
    body     NVARCHAR(MAX)  NOT NULL CHECK (ISJSON(body) = 1),
    sent_at  DATETIME2(3)   NOT NULL        -- UTC
);
GO
IF NOT EXISTS (SELECT 1 FROM sys.indexes WHERE name = N'messages_conv_seq')
    CREATE UNIQUE INDEX messages_conv_seq ON messages (conv, seq);
IF NOT EXISTS (SELECT 1 FROM sys.indexes WHERE name = N'messages_sender_sent_at')
    CREATE INDEX messages_sender_sent_at ON messages (sender, sent_at);
GO

-- The latest receipt per (conversation, user, kind); seq only moves forward.
IF OBJECT_ID(N'receipts', N'U') IS NULL
CREATE TABLE receipts (
    conv    NVARCHAR(450)  NOT NULL,
    [user]  NVARCHAR(256)  NOT NULL,
    kind    NVARCHAR(16)   NOT NULL CHECK (kind IN (N'delivered', N'read')),
    seq     BIGINT         NOT NULL,
    at      DATETIME2(3)   NOT NULL,
    [off]   BIGINT         NOT NULL,
    CONSTRAINT receipts_pk PRIMARY KEY NONCLUSTERED (conv, [user], kind)  -- 1444 key bytes: over the 900 of a clustered key
);
GO

-- Rooms (room.created / room.member) and direct conversations (from their messages).
IF OBJECT_ID(N'conversations', N'U') IS NULL
CREATE TABLE conversations (
    id           NVARCHAR(450)  NOT NULL PRIMARY KEY,
    kind         NVARCHAR(8)    NOT NULL CHECK (kind IN (N'dm', N'room')),
    name         NVARCHAR(MAX)  NULL,
    members      NVARCHAR(MAX)  NOT NULL DEFAULT N'[]' CHECK (ISJSON(members) = 1),
    members_off  BIGINT         NOT NULL DEFAULT 0,
    created_at   DATETIME2(3)   NULL,
    last_seq     BIGINT         NOT NULL DEFAULT 0,
    last_at      DATETIME2(3)   NULL,
    last_off     BIGINT         NOT NULL DEFAULT 0
);
GO

-- Every `presence` event.
IF OBJECT_ID(N'presence_log', N'U') IS NULL
CREATE TABLE presence_log (
    [off]    BIGINT         NOT NULL PRIMARY KEY,
    [user]   NVARCHAR(256)  NOT NULL,
    status   NVARCHAR(16)   NOT NULL,
    devices  INT            NOT NULL,
    scope    NVARCHAR(8)    NOT NULL DEFAULT N'public',
    at       DATETIME2(3)   NOT NULL
);
GO
IF NOT EXISTS (SELECT 1 FROM sys.indexes WHERE name = N'presence_log_user_at')
    CREATE INDEX presence_log_user_at ON presence_log ([user], at);
GO

-- One row per call: what billing reads.
IF OBJECT_ID(N'calls', N'U') IS NULL
CREATE TABLE calls (
    id           NVARCHAR(256)  NOT NULL PRIMARY KEY,
    initiator    NVARCHAR(256)  NOT NULL,
    device       NVARCHAR(256)  NOT NULL,
    media        NVARCHAR(8)    NOT NULL CHECK (media IN (N'audio', N'video')),
    invited      NVARCHAR(MAX)  NOT NULL CHECK (ISJSON(invited) = 1),
    started_at   DATETIME2(3)   NOT NULL,
    answered_at  DATETIME2(3)   NULL,
    answered_by  NVARCHAR(256)  NULL,
    ended_at     DATETIME2(3)   NULL,
    end_reason   NVARCHAR(16)   NULL,
    ended_by     NVARCHAR(256)  NULL,
    duration_ms  BIGINT         NULL,
    invite_off   BIGINT         NOT NULL
);
GO
IF NOT EXISTS (SELECT 1 FROM sys.indexes WHERE name = N'calls_initiator_started')
    CREATE INDEX calls_initiator_started ON calls (initiator, started_at);
GO

-- Every `notice` event.
IF OBJECT_ID(N'notices', N'U') IS NULL
CREATE TABLE notices (
    [off]   BIGINT         NOT NULL PRIMARY KEY,
    [user]  NVARCHAR(256)  NOT NULL,
    type    NVARCHAR(256)  NOT NULL,
    data    NVARCHAR(MAX)  NOT NULL CHECK (ISJSON(data) = 1),
    at      DATETIME2(3)   NOT NULL
);
GO

-- How far each sink got (same transaction as the rows).
IF OBJECT_ID(N'sync_checkpoint', N'U') IS NULL
CREATE TABLE sync_checkpoint (
    sink        NVARCHAR(64)  NOT NULL PRIMARY KEY,
    [off]       BIGINT        NOT NULL,
    updated_at  DATETIME2(3)  NOT NULL DEFAULT SYSUTCDATETIME()
);
GO

IF NOT EXISTS (SELECT 1 FROM switchboard_schema WHERE version = 1)
    INSERT INTO switchboard_schema (version, name) VALUES (1, N'init');
GO
