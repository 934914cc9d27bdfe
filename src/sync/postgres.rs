//! The PostgreSQL sink (tokio-postgres): migrations from `schema/postgres/`, and one
//! transaction per batch.
//!
//! Table layout: see `schema/postgres/0001_init.sql` and the table list in [`super`].
//! Bulk path: every table gets one multi-row statement per batch whose rows are array
//! parameters expanded by `unnest(...)` (a parameterized multi-row `INSERT ... SELECT`):
//! one round trip per table, whatever the batch size, no SQL built from data.
//!
//! Per batch, in one transaction: lock the sink's `sync_checkpoint` row (`FOR UPDATE`) and
//! check it still holds `batch.after` (else [`SyncError::CheckpointMoved`]), write rows
//! (`ON CONFLICT (off) DO NOTHING`; receipts, rooms, dms and calls as monotonic upserts
//! guarded by seq/offset/NULL columns), set the checkpoint to `batch.last`, commit.
//!
//! Connections are plain TCP (`NoTls`): run the sink on a trusted network or a local
//! socket; TLS to PostgreSQL is not implemented.

use std::collections::HashMap;

use tokio_postgres::{Client, NoTls};

use super::{Batch, Migration, Sink, SyncError};

/// The numbered migrations, in order.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "init",
    sql: include_str!("../../schema/postgres/0001_init.sql"),
}];

/// Tables emptied by a rebuild from offset 0.
const TABLES: &str = "messages, receipts, conversations, presence_log, calls, notices";

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS switchboard_schema (
    version integer PRIMARY KEY, name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())";

const LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtext('switchboard:' || coalesce(current_schema(), '')))";

const INSERT_MESSAGES: &str = "INSERT INTO messages (off, conv, seq, sender, device, cid, body, sent_at)
SELECT u.off, u.conv, u.seq, u.sender, u.device, u.cid, u.body::jsonb, to_timestamp(u.ts / 1000.0)
FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[])
    AS u(off, conv, seq, sender, device, cid, body, ts)
ON CONFLICT (off) DO NOTHING";

const UPSERT_RECEIPTS: &str = "INSERT INTO receipts (conv, \"user\", kind, seq, at, off)
SELECT u.conv, u.usr, u.kind, u.seq, to_timestamp(u.ts / 1000.0), u.off
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[])
    AS u(conv, usr, kind, seq, ts, off)
ON CONFLICT (conv, \"user\", kind) DO UPDATE
    SET seq = EXCLUDED.seq, at = EXCLUDED.at, off = EXCLUDED.off
    WHERE receipts.seq < EXCLUDED.seq";

const SELECT_ROOMS: &str =
    "SELECT id, members::text, members_off FROM conversations WHERE id = ANY($1::text[])";

const UPSERT_ROOMS: &str =
    "INSERT INTO conversations (id, kind, name, members, members_off, created_at)
SELECT u.id, 'room', u.name, u.members::jsonb, u.moff, to_timestamp(u.cts / 1000.0)
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])
    AS u(id, name, members, moff, cts)
ON CONFLICT (id) DO UPDATE
    SET name = COALESCE(EXCLUDED.name, conversations.name),
        members = EXCLUDED.members,
        members_off = EXCLUDED.members_off,
        created_at = COALESCE(conversations.created_at, EXCLUDED.created_at)
    WHERE conversations.members_off < EXCLUDED.members_off";

const UPSERT_CONVS: &str = "INSERT INTO conversations (id, kind, members, created_at, last_seq, last_at, last_off)
SELECT u.id, u.kind, u.members::jsonb, to_timestamp(u.fts / 1000.0), u.seq, to_timestamp(u.lts / 1000.0), u.off
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[])
    AS u(id, kind, members, fts, seq, lts, off)
ON CONFLICT (id) DO UPDATE
    SET last_seq = EXCLUDED.last_seq, last_at = EXCLUDED.last_at, last_off = EXCLUDED.last_off,
        created_at = COALESCE(conversations.created_at, EXCLUDED.created_at)
    WHERE conversations.last_off < EXCLUDED.last_off";

const INSERT_PRESENCE: &str = "INSERT INTO presence_log (off, \"user\", status, devices, scope, at)
SELECT u.off, u.usr, u.status, u.devices, u.scope, to_timestamp(u.ts / 1000.0)
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::bigint[])
    AS u(off, usr, status, devices, scope, ts)
ON CONFLICT (off) DO NOTHING";

const INSERT_CALLS: &str =
    "INSERT INTO calls (id, initiator, device, media, invited, started_at, invite_off)
SELECT u.id, u.initiator, u.device, u.media, u.invited::jsonb, to_timestamp(u.ts / 1000.0), u.off
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[])
    AS u(id, initiator, device, media, invited, ts, off)
ON CONFLICT (id) DO NOTHING";

const ACCEPT_CALLS: &str = "UPDATE calls AS c
SET answered_at = to_timestamp(u.ts / 1000.0), answered_by = u.usr
FROM unnest($1::text[], $2::text[], $3::bigint[]) AS u(id, usr, ts)
WHERE c.id = u.id AND c.answered_at IS NULL";

const END_CALLS: &str = "UPDATE calls AS c
SET ended_at = to_timestamp(u.ts / 1000.0), end_reason = u.reason, ended_by = u.by,
    duration_ms = u.dur
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[])
    AS u(id, reason, by, dur, ts)
WHERE c.id = u.id AND c.ended_at IS NULL";

const INSERT_NOTICES: &str = "INSERT INTO notices (off, \"user\", type, data, at)
SELECT u.off, u.usr, u.kind, u.data::jsonb, to_timestamp(u.ts / 1000.0)
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[])
    AS u(off, usr, kind, data, ts)
ON CONFLICT (off) DO NOTHING";

/// The PostgreSQL sink.
pub struct PgSink {
    config: tokio_postgres::Config,
    client: Option<Client>,
}

impl PgSink {
    /// Parses the connection string (URL or key=value); connects later.
    pub fn new(url: &str) -> Result<PgSink, SyncError> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| SyncError::Url(e.to_string()))?;
        Ok(PgSink {
            config,
            client: None,
        })
    }

    fn client(&mut self) -> Result<&mut Client, SyncError> {
        self.client
            .as_mut()
            .ok_or(SyncError::Data("not connected".into()))
    }

    /// Applies every migration not in `switchboard_schema` (one transaction, advisory lock).
    pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, SyncError> {
        let tx = client.transaction().await?;
        tx.execute(LOCK, &[]).await?;
        tx.batch_execute(VERSION_TABLE).await?;
        let applied: Vec<i32> = tx
            .query("SELECT version FROM switchboard_schema", &[])
            .await?
            .iter()
            .map(|r| r.try_get::<_, i32>(0))
            .collect::<Result<_, _>>()?;
        let mut done = Vec::new();
        for m in MIGRATIONS {
            if applied.contains(&m.version) {
                continue;
            }
            tx.batch_execute(m.sql)
                .await
                .map_err(|e| SyncError::Migration {
                    version: m.version,
                    name: m.name,
                    reason: e.to_string(),
                })?;
            tx.execute(
                "INSERT INTO switchboard_schema (version, name) VALUES ($1, $2) ON CONFLICT (version) DO NOTHING",
                &[&m.version, &m.name],
            )
            .await?;
            done.push(m.version);
        }
        tx.commit().await?;
        Ok(done)
    }
}

fn off_of(v: i64) -> Result<u64, SyncError> {
    u64::try_from(v).map_err(|_| SyncError::Data(format!("negative checkpoint {v}")))
}

impl Sink for PgSink {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn connect(&mut self) -> Result<u64, SyncError> {
        self.client = None;
        let (mut client, connection) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(sink = "postgres", error = %e, "connection closed");
            }
        });
        let applied = Self::migrate(&mut client).await?;
        if !applied.is_empty() {
            tracing::info!(sink = "postgres", versions = ?applied, "migrations applied");
        }
        client
            .execute(
                "INSERT INTO sync_checkpoint (sink, off) VALUES ($1, 0) ON CONFLICT (sink) DO NOTHING",
                &[&self.name()],
            )
            .await?;
        let row = client
            .query_one(
                "SELECT off FROM sync_checkpoint WHERE sink = $1",
                &[&self.name()],
            )
            .await?;
        let cp = off_of(row.try_get(0)?)?;
        self.client = Some(client);
        Ok(cp)
    }

    async fn write(&mut self, b: &Batch) -> Result<(), SyncError> {
        let name = self.name();
        let client = self.client()?;
        let tx = client.transaction().await?;
        let found = match tx
            .query_opt(
                "SELECT off FROM sync_checkpoint WHERE sink = $1 FOR UPDATE",
                &[&name],
            )
            .await?
        {
            Some(r) => off_of(r.try_get(0)?)?,
            None => 0,
        };
        if found != b.after {
            return Err(SyncError::CheckpointMoved {
                sink: name,
                found,
                expected: b.after,
            });
        }
        if !b.messages.is_empty() {
            let m = &b.messages;
            tx.execute(
                INSERT_MESSAGES,
                &[
                    &m.iter().map(|r| r.off).collect::<Vec<_>>(),
                    &m.iter().map(|r| r.conv.as_str()).collect::<Vec<_>>(),
                    &m.iter().map(|r| r.seq).collect::<Vec<_>>(),
                    &m.iter().map(|r| r.sender.as_str()).collect::<Vec<_>>(),
                    &m.iter().map(|r| r.device.as_deref()).collect::<Vec<_>>(),
                    &m.iter().map(|r| r.cid.as_deref()).collect::<Vec<_>>(),
                    &m.iter().map(|r| r.body.as_str()).collect::<Vec<_>>(),
                    &m.iter().map(|r| r.ts).collect::<Vec<_>>(),
                ],
            )
            .await?;
        }
        if !b.receipts.is_empty() {
            let r = &b.receipts;
            tx.execute(
                UPSERT_RECEIPTS,
                &[
                    &r.iter().map(|x| x.conv.as_str()).collect::<Vec<_>>(),
                    &r.iter().map(|x| x.user.as_str()).collect::<Vec<_>>(),
                    &r.iter().map(|x| x.kind).collect::<Vec<_>>(),
                    &r.iter().map(|x| x.seq).collect::<Vec<_>>(),
                    &r.iter().map(|x| x.ts).collect::<Vec<_>>(),
                    &r.iter().map(|x| x.off).collect::<Vec<_>>(),
                ],
            )
            .await?;
        }
        if !b.rooms.is_empty() {
            let ids: Vec<&str> = b.rooms.iter().map(|o| o.conv()).collect();
            let mut current = HashMap::new();
            for row in tx.query(SELECT_ROOMS, &[&ids]).await? {
                let members: String = row.try_get(1)?;
                let members: Vec<String> = serde_json::from_str(&members)
                    .map_err(|e| SyncError::Data(format!("conversations.members: {e}")))?;
                current.insert(row.try_get::<_, String>(0)?, (members, row.try_get(2)?));
            }
            let rows = b.fold_rooms(&current);
            tx.execute(
                UPSERT_ROOMS,
                &[
                    &rows.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
                    &rows.iter().map(|x| x.name.as_deref()).collect::<Vec<_>>(),
                    &rows.iter().map(|x| x.members.as_str()).collect::<Vec<_>>(),
                    &rows.iter().map(|x| x.members_off).collect::<Vec<_>>(),
                    &rows.iter().map(|x| x.created_ts).collect::<Vec<_>>(),
                ],
            )
            .await?;
        }
        if !b.convs.is_empty() {
            let c = &b.convs;
            tx.execute(
                UPSERT_CONVS,
                &[
                    &c.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.kind).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.members.as_str()).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.first_ts).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.last_seq).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.last_ts).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.last_off).collect::<Vec<_>>(),
                ],
            )
            .await?;
        }
        if !b.presence.is_empty() {
            let p = &b.presence;
            tx.execute(
                INSERT_PRESENCE,
                &[
                    &p.iter().map(|x| x.off).collect::<Vec<_>>(),
                    &p.iter().map(|x| x.user.as_str()).collect::<Vec<_>>(),
                    &p.iter().map(|x| x.status).collect::<Vec<_>>(),
                    &p.iter().map(|x| x.devices).collect::<Vec<_>>(),
                    &p.iter().map(|x| x.scope).collect::<Vec<_>>(),
                    &p.iter().map(|x| x.ts).collect::<Vec<_>>(),
                ],
            )
            .await?;
        }
        if !b.call_invites.is_empty() {
            let c = &b.call_invites;
            tx.execute(
                INSERT_CALLS,
                &[
                    &c.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.initiator.as_str()).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.device.as_str()).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.media).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.invited.as_str()).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.ts).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.off).collect::<Vec<_>>(),
                ],
            )
            .await?;
        }
        if !b.call_accepts.is_empty() {
            let c = &b.call_accepts;
            tx.execute(
                ACCEPT_CALLS,
                &[
                    &c.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.user.as_str()).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.ts).collect::<Vec<_>>(),
                ],
            )
            .await?;
        }
        if !b.call_ends.is_empty() {
            let c = &b.call_ends;
            tx.execute(
                END_CALLS,
                &[
                    &c.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.reason).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.by.as_deref()).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.duration_ms).collect::<Vec<_>>(),
                    &c.iter().map(|x| x.ts).collect::<Vec<_>>(),
                ],
            )
            .await?;
        }
        if !b.notices.is_empty() {
            let n = &b.notices;
            tx.execute(
                INSERT_NOTICES,
                &[
                    &n.iter().map(|x| x.off).collect::<Vec<_>>(),
                    &n.iter().map(|x| x.user.as_str()).collect::<Vec<_>>(),
                    &n.iter().map(|x| x.kind.as_str()).collect::<Vec<_>>(),
                    &n.iter().map(|x| x.data.as_str()).collect::<Vec<_>>(),
                    &n.iter().map(|x| x.ts).collect::<Vec<_>>(),
                ],
            )
            .await?;
        }
        let last = super::i(b.last);
        tx.execute(
            "UPDATE sync_checkpoint SET off = $2, updated_at = now() WHERE sink = $1",
            &[&name, &last],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn reset(&mut self, off: u64) -> Result<(), SyncError> {
        let name = self.name();
        let client = self.client()?;
        let tx = client.transaction().await?;
        tx.execute(LOCK, &[]).await?;
        if off == 0 {
            tx.batch_execute(&format!("TRUNCATE {TABLES}")).await?;
        }
        let off = super::i(off);
        tx.execute(
            "INSERT INTO sync_checkpoint (sink, off) VALUES ($1, $2)
             ON CONFLICT (sink) DO UPDATE SET off = EXCLUDED.off, updated_at = now()",
            &[&name, &off],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    fn disconnect(&mut self) {
        self.client = None;
    }
}
