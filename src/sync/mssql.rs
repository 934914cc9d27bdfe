//! The SQL Server sink (tiberius, TDS 7.3, rustls): migrations from `schema/mssql/`, and one
//! transaction per batch. SQL Server 2019+ (OPENJSON, ISJSON, DATETIME2).
//!
//! Table layout: `schema/mssql/0001_init.sql`, the twin of the PostgreSQL schema (same
//! tables and columns, T-SQL types; the differences are listed at the top of that file).
//!
//! Each statement below mirrors the PostgreSQL one in `postgres.rs`:
//! - `INSERT ... ON CONFLICT (off) DO NOTHING` -> `INSERT ... SELECT ... FROM (VALUES ...) v
//!   WHERE NOT EXISTS (SELECT 1 FROM t WITH (UPDLOCK, HOLDLOCK) WHERE t.[off] = v.[off])`;
//! - `ON CONFLICT ... DO UPDATE ... WHERE` -> `UPDATE t ... FROM t JOIN (VALUES ...) v ...
//!   WHERE <same guard>` then the insert-if-absent (no MERGE: its race and trigger pitfalls);
//! - `unnest($1::bigint[], ...)` array parameters -> multi-row `VALUES (@P1, ...), (...)`
//!   chunks (at most 1000 rows and 2000 parameters per statement: SQL Server's limits are
//!   1000 rows per VALUES and 2100 parameters per request);
//! - `to_timestamp(ms / 1000.0)` -> `DATEADD(MILLISECOND, ms % 86400000, DATEADD(DAY,
//!   ms / 86400000, '1970-01-01'))` (DATEADD takes an INT);
//! - `FOR UPDATE` -> `WITH (UPDLOCK, HOLDLOCK)`; `pg_advisory_xact_lock` -> `sp_getapplock`;
//! - `members::text` jsonb -> NVARCHAR(MAX) JSON text; `= ANY($1)` -> `IN (SELECT value FROM
//!   OPENJSON(@P1))`.
//!
//! Transactions are `BEGIN TRAN` / `COMMIT` batches with `SET XACT_ABORT ON`; any error drops
//! the connection, which rolls the transaction back.

use std::collections::HashMap;
use std::fmt::Write as _;

use tiberius::{Client, Config, Query};
use tokio::net::TcpStream;
use tokio_util::compat::{Compat, TokioAsyncWriteCompatExt};

use super::{Batch, Migration, Sink, SyncError};

/// The numbered migrations, in order.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "init",
    sql: include_str!("../../schema/mssql/0001_init.sql"),
}];

/// Most parameters in one request (the server's limit is 2100).
const MAX_PARAMS: usize = 2000;
/// Most rows in one table value constructor (the server's limit).
const MAX_ROWS: usize = 1000;

type Conn = Client<Compat<TcpStream>>;

/// `ms` (a BIGINT of Unix milliseconds) as a DATETIME2(3) expression.
fn dt(ms: &str) -> String {
    format!(
        "DATEADD(MILLISECOND, CAST({ms} % 86400000 AS INT), DATEADD(DAY, CAST({ms} / 86400000 AS INT), CAST('1970-01-01' AS DATETIME2(3))))"
    )
}

/// The SQL Server sink.
pub struct MsSink {
    config: Config,
    client: Option<Conn>,
}

impl MsSink {
    /// Parses the ADO.NET connection string; connects later.
    pub fn new(url: &str) -> Result<MsSink, SyncError> {
        let config = Config::from_ado_string(url).map_err(|e| SyncError::Url(e.to_string()))?;
        Ok(MsSink {
            config,
            client: None,
        })
    }

    fn client(&mut self) -> Result<&mut Conn, SyncError> {
        self.client
            .as_mut()
            .ok_or(SyncError::Data("not connected".into()))
    }

    /// Applies every migration not in `switchboard_schema` (one transaction, app lock).
    pub async fn migrate(c: &mut Conn) -> Result<Vec<i32>, SyncError> {
        batch(c, "SET XACT_ABORT ON; BEGIN TRAN").await?;
        batch(
            c,
            "EXEC sp_getapplock @Resource = N'switchboard:schema', @LockMode = N'Exclusive', @LockOwner = N'Transaction'",
        )
        .await?;
        batch(
            c,
            "IF OBJECT_ID(N'switchboard_schema', N'U') IS NULL
             CREATE TABLE switchboard_schema (version INT NOT NULL PRIMARY KEY,
                 name NVARCHAR(200) NOT NULL, applied_at DATETIME2(3) NOT NULL DEFAULT SYSUTCDATETIME())",
        )
        .await?;
        let rows = c
            .simple_query("SELECT version FROM switchboard_schema")
            .await?
            .into_first_result()
            .await?;
        let mut applied = Vec::new();
        for r in rows {
            if let Some(v) = r.try_get::<i32, _>(0)? {
                applied.push(v);
            }
        }
        let mut done = Vec::new();
        for m in MIGRATIONS {
            if applied.contains(&m.version) {
                continue;
            }
            for part in split_go(m.sql) {
                batch(c, &part).await.map_err(|e| SyncError::Migration {
                    version: m.version,
                    name: m.name,
                    reason: e.to_string(),
                })?;
            }
            let mut q = Query::new(
                "IF NOT EXISTS (SELECT 1 FROM switchboard_schema WHERE version = @P1)
                 INSERT INTO switchboard_schema (version, name) VALUES (@P1, @P2)",
            );
            q.bind(m.version);
            q.bind(m.name);
            q.execute(c).await?;
            done.push(m.version);
        }
        batch(c, "COMMIT").await?;
        Ok(done)
    }
}

/// Runs a batch of T-SQL and drains its results.
async fn batch(c: &mut Conn, sql: &str) -> Result<(), SyncError> {
    c.simple_query(sql.to_string())
        .await?
        .into_results()
        .await?;
    Ok(())
}

/// Splits a script on lines holding only `GO` (the sqlcmd batch separator).
pub fn split_go(script: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in script.lines() {
        if line.trim().eq_ignore_ascii_case("go") {
            if !cur.trim().is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            cur.clear();
        } else {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    out
}

/// `(@P1,@P2),(@P3,@P4)` for `rows` rows of `cols` parameters.
fn values(rows: usize, cols: usize) -> String {
    let mut s = String::with_capacity(rows * cols * 6);
    let mut n = 0;
    for r in 0..rows {
        if r > 0 {
            s.push(',');
        }
        s.push('(');
        for c in 0..cols {
            if c > 0 {
                s.push(',');
            }
            n += 1;
            let _ = write!(s, "@P{n}");
        }
        s.push(')');
    }
    s
}

/// Runs `template` (with `{values}` where the rows go) once per chunk of `rows`.
async fn exec_rows<R>(
    c: &mut Conn,
    template: &str,
    rows: &[R],
    cols: usize,
    bind: fn(&mut Query<'static>, &R),
) -> Result<(), SyncError> {
    let per = (MAX_PARAMS / cols).clamp(1, MAX_ROWS);
    for chunk in rows.chunks(per) {
        let sql = template.replace("{values}", &values(chunk.len(), cols));
        let mut q = Query::new(sql);
        for r in chunk {
            bind(&mut q, r);
        }
        q.execute(c).await?;
    }
    Ok(())
}

fn off_of(v: Option<i64>) -> Result<u64, SyncError> {
    let v = v.unwrap_or(0);
    u64::try_from(v).map_err(|_| SyncError::Data(format!("negative checkpoint {v}")))
}

impl Sink for MsSink {
    fn name(&self) -> &'static str {
        "mssql"
    }

    async fn connect(&mut self) -> Result<u64, SyncError> {
        self.client = None;
        let tcp = TcpStream::connect(self.config.get_addr()).await?;
        tcp.set_nodelay(true)?;
        let mut c = Client::connect(self.config.clone(), tcp.compat_write()).await?;
        batch(&mut c, "SET XACT_ABORT ON").await?;
        let applied = Self::migrate(&mut c).await?;
        if !applied.is_empty() {
            tracing::info!(sink = "mssql", versions = ?applied, "migrations applied");
        }
        let mut q = Query::new(
            "IF NOT EXISTS (SELECT 1 FROM sync_checkpoint WHERE sink = @P1)
                 INSERT INTO sync_checkpoint (sink, [off]) VALUES (@P1, 0);
             SELECT [off] FROM sync_checkpoint WHERE sink = @P1",
        );
        q.bind(self.name());
        let rows = q.query(&mut c).await?.into_results().await?;
        let cp = rows
            .iter()
            .flatten()
            .next()
            .map(|r| r.try_get::<i64, _>(0))
            .transpose()?
            .flatten();
        let cp = off_of(cp)?;
        self.client = Some(c);
        Ok(cp)
    }

    async fn write(&mut self, b: &Batch) -> Result<(), SyncError> {
        let name = self.name();
        let c = self.client()?;
        batch(c, "BEGIN TRAN").await?;
        let mut q = Query::new(
            "SELECT [off] FROM sync_checkpoint WITH (UPDLOCK, HOLDLOCK) WHERE sink = @P1",
        );
        q.bind(name);
        let found = q
            .query(c)
            .await?
            .into_first_result()
            .await?
            .first()
            .map(|r| r.try_get::<i64, _>(0))
            .transpose()?
            .flatten();
        let found = off_of(found)?;
        if found != b.after {
            batch(c, "ROLLBACK").await?;
            return Err(SyncError::CheckpointMoved {
                sink: name,
                found,
                expected: b.after,
            });
        }
        let ts = dt("v.ts");
        exec_rows(
            c,
            &format!(
                "INSERT INTO messages ([off], conv, seq, sender, device, cid, body, sent_at)
                 SELECT v.[off], v.conv, v.seq, v.sender, v.device, v.cid, v.body, {ts}
                 FROM (VALUES {{values}}) AS v([off], conv, seq, sender, device, cid, body, ts)
                 WHERE NOT EXISTS (SELECT 1 FROM messages m WITH (UPDLOCK, HOLDLOCK) WHERE m.[off] = v.[off])"
            ),
            &b.messages,
            8,
            |q, r| {
                q.bind(r.off);
                q.bind(r.conv.clone());
                q.bind(r.seq);
                q.bind(r.sender.clone());
                q.bind(r.device.clone());
                q.bind(r.cid.clone());
                q.bind(r.body.clone());
                q.bind(r.ts);
            },
        )
        .await?;
        exec_rows(
            c,
            &format!(
                "UPDATE r SET seq = v.seq, at = {ts}, [off] = v.[off]
                 FROM receipts r JOIN (VALUES {{values}}) AS v(conv, usr, kind, seq, ts, [off])
                   ON r.conv = v.conv AND r.[user] = v.usr AND r.kind = v.kind
                 WHERE r.seq < v.seq;
                 INSERT INTO receipts (conv, [user], kind, seq, at, [off])
                 SELECT v.conv, v.usr, v.kind, v.seq, {ts}, v.[off]
                 FROM (VALUES {{values}}) AS v(conv, usr, kind, seq, ts, [off])
                 WHERE NOT EXISTS (SELECT 1 FROM receipts r WITH (UPDLOCK, HOLDLOCK)
                   WHERE r.conv = v.conv AND r.[user] = v.usr AND r.kind = v.kind)"
            ),
            &b.receipts,
            6,
            |q, r| {
                q.bind(r.conv.clone());
                q.bind(r.user.clone());
                q.bind(r.kind);
                q.bind(r.seq);
                q.bind(r.ts);
                q.bind(r.off);
            },
        )
        .await?;
        if !b.rooms.is_empty() {
            let ids: Vec<&str> = b.rooms.iter().map(|o| o.conv()).collect();
            let ids = serde_json::to_string(&ids).map_err(|e| SyncError::Data(e.to_string()))?;
            let mut q = Query::new(
                "SELECT id, members, members_off FROM conversations WITH (UPDLOCK, HOLDLOCK)
                 WHERE id IN (SELECT value FROM OPENJSON(@P1))",
            );
            q.bind(ids);
            let mut current = HashMap::new();
            for row in q.query(c).await?.into_first_result().await? {
                let id: Option<&str> = row.try_get(0)?;
                let members: Option<&str> = row.try_get(1)?;
                let moff: Option<i64> = row.try_get(2)?;
                let members: Vec<String> = serde_json::from_str(members.unwrap_or("[]"))
                    .map_err(|e| SyncError::Data(format!("conversations.members: {e}")))?;
                current.insert(
                    id.unwrap_or_default().to_string(),
                    (members, moff.unwrap_or(0)),
                );
            }
            let rows = b.fold_rooms(&current);
            let cts = dt("v.cts");
            exec_rows(
                c,
                &format!(
                    "UPDATE t SET name = COALESCE(v.name, t.name), members = v.members,
                         members_off = v.moff, created_at = COALESCE(t.created_at, {cts})
                     FROM conversations t JOIN (VALUES {{values}}) AS v(id, name, members, moff, cts)
                       ON t.id = v.id
                     WHERE t.members_off < v.moff;
                     INSERT INTO conversations (id, kind, name, members, members_off, created_at)
                     SELECT v.id, N'room', v.name, v.members, v.moff, {cts}
                     FROM (VALUES {{values}}) AS v(id, name, members, moff, cts)
                     WHERE NOT EXISTS (SELECT 1 FROM conversations t WHERE t.id = v.id)"
                ),
                &rows,
                5,
                |q, r| {
                    q.bind(r.id.clone());
                    q.bind(r.name.clone());
                    q.bind(r.members.clone());
                    q.bind(r.members_off);
                    q.bind(r.created_ts);
                },
            )
            .await?;
        }
        let (fts, lts) = (dt("v.fts"), dt("v.lts"));
        exec_rows(
            c,
            &format!(
                "UPDATE t SET last_seq = v.seq, last_at = {lts}, last_off = v.[off],
                     created_at = COALESCE(t.created_at, {fts})
                 FROM conversations t JOIN (VALUES {{values}}) AS v(id, kind, members, fts, seq, lts, [off])
                   ON t.id = v.id
                 WHERE t.last_off < v.[off];
                 INSERT INTO conversations (id, kind, members, created_at, last_seq, last_at, last_off)
                 SELECT v.id, v.kind, v.members, {fts}, v.seq, {lts}, v.[off]
                 FROM (VALUES {{values}}) AS v(id, kind, members, fts, seq, lts, [off])
                 WHERE NOT EXISTS (SELECT 1 FROM conversations t WITH (UPDLOCK, HOLDLOCK) WHERE t.id = v.id)"
            ),
            &b.convs,
            7,
            |q, r| {
                q.bind(r.id.clone());
                q.bind(r.kind);
                q.bind(r.members.clone());
                q.bind(r.first_ts);
                q.bind(r.last_seq);
                q.bind(r.last_ts);
                q.bind(r.last_off);
            },
        )
        .await?;
        exec_rows(
            c,
            &format!(
                "INSERT INTO presence_log ([off], [user], status, devices, scope, at)
                 SELECT v.[off], v.usr, v.status, v.devices, v.scope, {ts}
                 FROM (VALUES {{values}}) AS v([off], usr, status, devices, scope, ts)
                 WHERE NOT EXISTS (SELECT 1 FROM presence_log p WITH (UPDLOCK, HOLDLOCK) WHERE p.[off] = v.[off])"
            ),
            &b.presence,
            6,
            |q, r| {
                q.bind(r.off);
                q.bind(r.user.clone());
                q.bind(r.status);
                q.bind(r.devices);
                q.bind(r.scope);
                q.bind(r.ts);
            },
        )
        .await?;
        exec_rows(
            c,
            &format!(
                "INSERT INTO calls (id, initiator, device, media, invited, started_at, invite_off)
                 SELECT v.id, v.initiator, v.device, v.media, v.invited, {ts}, v.[off]
                 FROM (VALUES {{values}}) AS v(id, initiator, device, media, invited, ts, [off])
                 WHERE NOT EXISTS (SELECT 1 FROM calls t WITH (UPDLOCK, HOLDLOCK) WHERE t.id = v.id)"
            ),
            &b.call_invites,
            7,
            |q, r| {
                q.bind(r.id.clone());
                q.bind(r.initiator.clone());
                q.bind(r.device.clone());
                q.bind(r.media);
                q.bind(r.invited.clone());
                q.bind(r.ts);
                q.bind(r.off);
            },
        )
        .await?;
        exec_rows(
            c,
            &format!(
                "UPDATE t SET answered_at = {ts}, answered_by = v.usr
                 FROM calls t JOIN (VALUES {{values}}) AS v(id, usr, ts) ON t.id = v.id
                 WHERE t.answered_at IS NULL"
            ),
            &b.call_accepts,
            3,
            |q, r| {
                q.bind(r.id.clone());
                q.bind(r.user.clone());
                q.bind(r.ts);
            },
        )
        .await?;
        exec_rows(
            c,
            &format!(
                "UPDATE t SET ended_at = {ts}, end_reason = v.reason, ended_by = v.ended_by,
                     duration_ms = v.dur
                 FROM calls t JOIN (VALUES {{values}}) AS v(id, reason, ended_by, dur, ts) ON t.id = v.id
                 WHERE t.ended_at IS NULL"
            ),
            &b.call_ends,
            5,
            |q, r| {
                q.bind(r.id.clone());
                q.bind(r.reason);
                q.bind(r.by.clone());
                q.bind(r.duration_ms);
                q.bind(r.ts);
            },
        )
        .await?;
        exec_rows(
            c,
            &format!(
                "INSERT INTO notices ([off], [user], type, data, at)
                 SELECT v.[off], v.usr, v.kind, v.data, {ts}
                 FROM (VALUES {{values}}) AS v([off], usr, kind, data, ts)
                 WHERE NOT EXISTS (SELECT 1 FROM notices n WITH (UPDLOCK, HOLDLOCK) WHERE n.[off] = v.[off])"
            ),
            &b.notices,
            5,
            |q, r| {
                q.bind(r.off);
                q.bind(r.user.clone());
                q.bind(r.kind.clone());
                q.bind(r.data.clone());
                q.bind(r.ts);
            },
        )
        .await?;
        let mut q = Query::new(
            "UPDATE sync_checkpoint SET [off] = @P2, updated_at = SYSUTCDATETIME() WHERE sink = @P1",
        );
        q.bind(name);
        q.bind(super::i(b.last));
        q.execute(c).await?;
        batch(c, "COMMIT").await?;
        Ok(())
    }

    async fn reset(&mut self, off: u64) -> Result<(), SyncError> {
        let name = self.name();
        let c = self.client()?;
        batch(c, "BEGIN TRAN").await?;
        if off == 0 {
            // DELETE, not TRUNCATE: no ALTER permission needed, and it is transactional
            // the same way (TRUNCATE in PostgreSQL).
            batch(
                c,
                "DELETE FROM messages; DELETE FROM receipts; DELETE FROM conversations;
                 DELETE FROM presence_log; DELETE FROM calls; DELETE FROM notices;",
            )
            .await?;
        }
        let mut q = Query::new(
            "UPDATE sync_checkpoint SET [off] = @P2, updated_at = SYSUTCDATETIME() WHERE sink = @P1;
             IF @@ROWCOUNT = 0 INSERT INTO sync_checkpoint (sink, [off]) VALUES (@P1, @P2)",
        );
        q.bind(name);
        q.bind(super::i(off));
        q.execute(c).await?;
        batch(c, "COMMIT").await?;
        Ok(())
    }

    fn disconnect(&mut self) {
        self.client = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_splits_on_go_lines() {
        let parts = split_go(MIGRATIONS[0].sql);
        assert!(parts.len() > 5);
        assert!(parts.iter().all(|p| !p.lines().any(|l| l.trim() == "GO")));
    }

    #[test]
    fn values_numbers_parameters_row_by_row() {
        assert_eq!(values(2, 2), "(@P1,@P2),(@P3,@P4)");
    }
}
