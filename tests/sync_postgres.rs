//! SQL sync against real databases: PostgreSQL on 127.0.0.1:5432 (database `test`, user
//! `postgres`, each test in its own schema) and, when `MSSQL_URL` is set (an ADO.NET
//! connection string with rights to create databases), SQL Server (each test in its own
//! database). The same test bodies run against both.
//!
//! A database that is not reachable skips its tests with a printed reason, unless
//! `SWITCHBOARD_REQUIRE_DB` is set, in which case the test fails.
//!
//! Every check compares the sink's tables with the log as `GET /v1/events` returns it, at
//! the checkpoint the sink reports: messages, receipts (latest per user and kind), rooms
//! and dms, presence, calls, notices, and the checkpoint itself. Waits are bounded; nothing
//! asserts on wall-clock durations.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::compat::TokioAsyncWriteCompatExt;

const PG_ADMIN: &str = "host=127.0.0.1 port=5432 user=postgres dbname=test connect_timeout=3";
const SYNC_WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// the database under test

enum Conn {
    Pg(tokio_postgres::Client),
    Ms(Box<tiberius::Client<tokio_util::compat::Compat<TcpStream>>>),
}

/// One isolated place in a database (a PostgreSQL schema or a SQL Server database).
struct TestDb {
    /// `postgres` or `mssql`.
    sink: &'static str,
    /// The sink's connection string.
    url: String,
    /// Where the database listens (for the proxy).
    upstream: String,
    conn: Conn,
    name: String,
}

fn require_db() -> bool {
    std::env::var_os("SWITCHBOARD_REQUIRE_DB").is_some()
}

fn skip(what: &str, why: &str) {
    if require_db() {
        panic!("{what}: {why} (SWITCHBOARD_REQUIRE_DB is set)");
    }
    eprintln!("skipped: {what}: {why}");
}

async fn pg_connect(url: &str) -> Result<tokio_postgres::Client, String> {
    let fut = tokio_postgres::connect(url, tokio_postgres::NoTls);
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(Ok((client, conn))) => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(client)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".into()),
    }
}

async fn ms_connect(
    url: &str,
) -> Result<tiberius::Client<tokio_util::compat::Compat<TcpStream>>, String> {
    let config = tiberius::Config::from_ado_string(url).map_err(|e| e.to_string())?;
    let fut = async {
        let tcp = TcpStream::connect(config.get_addr())
            .await
            .map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        tiberius::Client::connect(config.clone(), tcp.compat_write())
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(r) => r,
        Err(_) => Err("connect timed out".into()),
    }
}

impl TestDb {
    /// A fresh schema in the local PostgreSQL, or None (skipped) when it is unreachable.
    async fn postgres(test: &str) -> Option<TestDb> {
        let admin = match pg_connect(PG_ADMIN).await {
            Ok(c) => c,
            Err(e) => {
                skip(
                    test,
                    &format!("PostgreSQL not reachable at 127.0.0.1:5432 ({e})"),
                );
                return None;
            }
        };
        let name = uid("sbt").replace('-', "_");
        admin
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .expect("create schema");
        let url = format!("{PG_ADMIN} options='-c search_path={name}'");
        let conn = pg_connect(&url).await.expect("connect to the test schema");
        Some(TestDb {
            sink: "postgres",
            url,
            upstream: "127.0.0.1:5432".into(),
            conn: Conn::Pg(conn),
            name,
        })
    }

    /// A fresh database on the SQL Server of `MSSQL_URL`, or None (skipped).
    async fn mssql(test: &str) -> Option<TestDb> {
        let Ok(base) = std::env::var("MSSQL_URL") else {
            eprintln!("skipped: {test} (SQL Server): MSSQL_URL is not set");
            return None;
        };
        let mut admin = match ms_connect(&base).await {
            Ok(c) => c,
            Err(e) => {
                skip(
                    test,
                    &format!("SQL Server not reachable at MSSQL_URL ({e})"),
                );
                return None;
            }
        };
        let name = uid("sbt").replace('-', "_");
        admin
            .simple_query(format!("CREATE DATABASE {name}"))
            .await
            .expect("create database")
            .into_results()
            .await
            .expect("create database");
        let url = format!("{base};database={name}");
        let upstream = tiberius::Config::from_ado_string(&base)
            .expect("MSSQL_URL parses")
            .get_addr();
        let mut conn = ms_connect(&url)
            .await
            .expect("connect to the test database");
        conn.simple_query("SET QUOTED_IDENTIFIER ON")
            .await
            .expect("set")
            .into_results()
            .await
            .expect("set");
        Some(TestDb {
            sink: "mssql",
            url,
            upstream,
            conn: Conn::Ms(Box::new(conn)),
            name,
        })
    }

    /// The sink's URL through a proxy on `addr` instead of the database itself.
    fn url_via(&self, addr: SocketAddr) -> String {
        match self.sink {
            "postgres" => format!(
                "host=127.0.0.1 port={} user=postgres dbname=test connect_timeout=3 options='-c search_path={}'",
                addr.port(),
                self.name
            ),
            _ => format!("{};server=tcp:127.0.0.1,{}", self.url, addr.port()),
        }
    }

    /// The config key (as an environment variable) naming this sink.
    fn env_key(&self) -> &'static str {
        match self.sink {
            "postgres" => "SWITCHBOARD_SYNC__POSTGRES__URL",
            _ => "SWITCHBOARD_SYNC__MSSQL__URL",
        }
    }

    fn configure(&self, cfg: &mut switchboard::Config, url: &str) {
        match self.sink {
            "postgres" => cfg.sync.postgres.url = url.to_string(),
            _ => cfg.sync.mssql.url = url.to_string(),
        }
        cfg.sync.batch_ms = 20;
        cfg.sync.retry_base_ms = 50;
        cfg.sync.retry_cap_ms = 300;
    }

    /// A timestamp column as Unix ms.
    fn ms(&self, col: &str) -> String {
        match self.sink {
            "postgres" => format!("(extract(epoch from {col}) * 1000)::bigint"),
            _ => format!("DATEDIFF_BIG(MILLISECOND, '1970-01-01', {col})"),
        }
    }

    /// Every row of `sql`, every value as text (None for NULL).
    async fn rows(&mut self, sql: &str) -> Vec<Vec<Option<String>>> {
        match &mut self.conn {
            Conn::Pg(c) => {
                let mut out = Vec::new();
                for m in c
                    .simple_query(sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
                {
                    if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                        out.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
                    }
                }
                out
            }
            Conn::Ms(c) => {
                let rows = c
                    .simple_query(sql.to_string())
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"))
                    .into_first_result()
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                rows.into_iter()
                    .map(|r| r.into_iter().map(ms_text).collect())
                    .collect()
            }
        }
    }

    async fn drop_place(mut self) {
        match &mut self.conn {
            Conn::Pg(c) => {
                let _ = c
                    .batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name))
                    .await;
            }
            Conn::Ms(_) => {
                if let Ok(base) = std::env::var("MSSQL_URL") {
                    if let Ok(mut admin) = ms_connect(&base).await {
                        let _ = admin
                            .simple_query(format!(
                                "ALTER DATABASE {0} SET SINGLE_USER WITH ROLLBACK IMMEDIATE; DROP DATABASE {0}",
                                self.name
                            ))
                            .await;
                    }
                }
            }
        }
    }
}

fn ms_text(d: tiberius::ColumnData<'static>) -> Option<String> {
    use tiberius::ColumnData as C;
    match d {
        C::U8(v) => v.map(|x| x.to_string()),
        C::I16(v) => v.map(|x| x.to_string()),
        C::I32(v) => v.map(|x| x.to_string()),
        C::I64(v) => v.map(|x| x.to_string()),
        C::Bit(v) => v.map(|x| x.to_string()),
        C::String(v) => v.map(|x| x.to_string()),
        other => Some(format!("{other:?}")),
    }
}

// ---------------------------------------------------------------------------------------------
// the log, and what the tables must hold

/// Every event of the log (`/v1/events`), in order.
async fn all_events(ep: &Endpoint) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    loop {
        let after = out.last().map(off).unwrap_or(0);
        let r = ep
            .http()
            .get(&format!("/v1/events?after={after}&limit=1000"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let page: Vec<Value> = r
            .text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("ndjson line"))
            .collect();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

/// The sink's entry in `/v1/stats`.
async fn sink_stats(ep: &Endpoint, sink: &str) -> Value {
    let r = ep.http().get("/v1/stats").await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()["sync"][sink].clone()
}

/// Waits (bounded) until the sink is up with no lag; returns the head it reached.
async fn wait_synced(ep: &Endpoint, sink: &str) -> u64 {
    let deadline = Instant::now() + SYNC_WAIT;
    loop {
        let s = sink_stats(ep, sink).await;
        if s["state"] == "up" && s["lag"] == json!(0) {
            return s["checkpoint"].as_u64().expect("checkpoint");
        }
        assert!(
            Instant::now() < deadline,
            "sink {sink} not caught up within {SYNC_WAIT:?}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Rows = Vec<Vec<Option<String>>>;

fn s(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(x) => Some(x.clone()),
        other => Some(other.to_string()),
    }
}

/// What every table should hold after the records of `events`.
fn expected(events: &[Value]) -> BTreeMap<&'static str, Rows> {
    let mut messages = Rows::new();
    let mut receipts: BTreeMap<(String, String, String), (u64, Value)> = BTreeMap::new();
    let mut presence = Rows::new();
    let mut notices = Rows::new();
    let mut calls: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    let mut rooms: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for e in events {
        let o = off(e).to_string();
        match e["ev"].as_str().unwrap_or_default() {
            "message" => {
                messages.push(vec![
                    Some(o),
                    s(&e["conv"]),
                    s(&e["seq"]),
                    s(&e["from"]),
                    s(&e["device"]),
                    s(&e["cid"]),
                    Some(e["body"].to_string()),
                    s(&e["ts"]),
                ]);
                last.insert(e["conv"].as_str().unwrap().to_string(), seq(e));
            }
            "receipt" => {
                let k = (
                    s(&e["conv"]).unwrap(),
                    s(&e["user"]).unwrap(),
                    s(&e["kind"]).unwrap(),
                );
                let cur = receipts.entry(k).or_insert((0, Value::Null));
                if seq(e) > cur.0 {
                    *cur = (seq(e), e["ts"].clone());
                }
            }
            "presence" => presence.push(vec![Some(o), s(&e["user"]), s(&e["status"])]),
            "notice" => notices.push(vec![Some(o), s(&e["to"][0]), s(&e["type"])]),
            "room.created" => {
                let members = e["members"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| m.as_str().unwrap().to_string())
                    .collect();
                rooms.insert(s(&e["conv"]).unwrap(), (s(&e["name"]).unwrap(), members));
            }
            "room.member" => {
                let r = rooms.get_mut(e["conv"].as_str().unwrap()).unwrap();
                let u = s(&e["user"]).unwrap();
                if e["change"] == "joined" {
                    r.1.insert(u);
                } else {
                    r.1.remove(&u);
                }
            }
            "call.invite" => {
                // (`to` on /v1/events is the audience, not the invitees: checked apart.)
                calls.insert(
                    s(&e["call"]).unwrap(),
                    vec![
                        s(&e["call"]),
                        s(&e["from"]),
                        s(&e["media"]),
                        s(&e["ts"]),
                        None,
                        None,
                        None,
                        None,
                        None,
                    ],
                );
            }
            "call.accepted" => {
                let c = calls.get_mut(e["call"].as_str().unwrap()).unwrap();
                if c[4].is_none() {
                    c[4] = s(&e["ts"]);
                    c[5] = s(&e["user"]);
                }
            }
            "call.ended" => {
                let c = calls.get_mut(e["call"].as_str().unwrap()).unwrap();
                c[6] = s(&e["ts"]);
                c[7] = s(&e["reason"]);
                c[8] = s(&e["duration_ms"]);
            }
            _ => {}
        }
    }
    let mut convs = Rows::new();
    let mut ids: BTreeSet<String> = last.keys().cloned().collect();
    ids.extend(rooms.keys().cloned());
    for id in ids {
        let members = match rooms.get(&id) {
            Some((_, m)) => m.iter().cloned().collect::<Vec<_>>(),
            None => id
                .strip_prefix("dm:")
                .unwrap()
                .split(':')
                .map(str::to_string)
                .collect(),
        };
        convs.push(vec![
            Some(id.clone()),
            Some(if id.starts_with("dm:") { "dm" } else { "room" }.into()),
            rooms.get(&id).map(|r| r.0.clone()),
            Some(json!(members).to_string()),
            Some(last.get(&id).copied().unwrap_or(0).to_string()),
        ]);
    }
    BTreeMap::from([
        ("messages", messages),
        (
            "receipts",
            receipts
                .into_iter()
                .map(|((c, u, k), (sq, ts))| {
                    vec![Some(c), Some(u), Some(k), Some(sq.to_string()), s(&ts)]
                })
                .collect(),
        ),
        ("presence_log", presence),
        ("notices", notices),
        ("calls", calls.into_values().collect()),
        ("conversations", convs),
    ])
}

/// Normalizes JSON text columns (jsonb adds spaces) so both sides compare.
fn norm_json(v: &Option<String>) -> Option<String> {
    v.as_ref().map(|t| match serde_json::from_str::<Value>(t) {
        Ok(j) => j.to_string(),
        Err(_) => t.clone(),
    })
}

/// The tables, shaped like [`expected`].
async fn actual(db: &mut TestDb) -> BTreeMap<&'static str, Rows> {
    let sent_at = db.ms("sent_at");
    let at = db.ms("at");
    let (started, answered, ended) = (db.ms("started_at"), db.ms("answered_at"), db.ms("ended_at"));
    let mut messages = db
        .rows(&format!(
            "SELECT \"off\", conv, seq, sender, device, cid, body, {sent_at} FROM messages ORDER BY \"off\""
        ))
        .await;
    for r in &mut messages {
        r[6] = norm_json(&r[6]);
    }
    let receipts = db
        .rows(&format!(
            "SELECT conv, \"user\", kind, seq, {at} FROM receipts ORDER BY conv, \"user\", kind"
        ))
        .await;
    let presence = db
        .rows("SELECT \"off\", \"user\", status FROM presence_log ORDER BY \"off\"")
        .await;
    let notices = db
        .rows("SELECT \"off\", \"user\", type FROM notices ORDER BY \"off\"")
        .await;
    let calls = db
        .rows(&format!(
            "SELECT id, initiator, media, {started}, {answered}, answered_by, {ended}, end_reason, duration_ms FROM calls ORDER BY id"
        ))
        .await;
    let mut convs = db
        .rows("SELECT id, kind, name, members, last_seq FROM conversations ORDER BY id")
        .await;
    for r in &mut convs {
        r[3] = norm_json(&r[3]);
    }
    BTreeMap::from([
        ("messages", messages),
        ("receipts", receipts),
        ("presence_log", presence),
        ("notices", notices),
        ("calls", calls),
        ("conversations", convs),
    ])
}

async fn checkpoint(db: &mut TestDb) -> u64 {
    let sql = format!(
        "SELECT \"off\" FROM sync_checkpoint WHERE sink = '{}'",
        db.sink
    );
    let rows = db.rows(&sql).await;
    rows.first()
        .and_then(|r| r[0].as_deref())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The tables equal the log up to the checkpoint (read twice around the tables, so a
/// batch committed meanwhile is retried).
async fn verify(db: &mut TestDb, ep: &Endpoint) -> u64 {
    let events = all_events(ep).await;
    for _ in 0..20 {
        let cp = checkpoint(db).await;
        let got = actual(db).await;
        if checkpoint(db).await != cp {
            continue;
        }
        let upto: Vec<Value> = events.iter().filter(|e| off(e) <= cp).cloned().collect();
        assert_eq!(
            upto.last().map(off),
            Some(cp),
            "the checkpoint {cp} is not an offset of the log"
        );
        let want = expected(&upto);
        for (table, rows) in &want {
            assert_eq!(
                &got[table], rows,
                "table {table} differs from the log up to {cp} (sink {})",
                db.sink
            );
        }
        return cp;
    }
    panic!("the checkpoint kept moving while the tables were read");
}

// ---------------------------------------------------------------------------------------------
// load

/// Messages (a dm and a room), room membership changes, receipts, presence changes, a
/// notice, an answered call that is hung up and a rejected call.
async fn burst(ep: &Endpoint, n: usize) -> Vec<Client> {
    let (alice, bob, carol) = (uid("alice"), uid("bob"), uid("carol"));
    let a1 = ep.connect(&alice, "a1").await;
    let b1 = ep.connect(&bob, "b1").await;
    let c1 = ep.connect(&carol, "c1").await;
    let room = ep.http().create_room("Ops", &[&alice, &bob]).await;
    let r = ep
        .http()
        .put(&format!("/v1/rooms/{room}/members/{carol}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let replies = a1.pipeline(send_frames(&bob, "m", n), 32).await;
    assert!(replies.iter().all(|r| r["ok"] == json!(true)));
    let room_conv = format!("room:{room}");
    let frames = (0..n / 4)
        .map(|i| json!({"op": "send", "conv": room_conv, "body": {"r": i, "t": "é\"'"}, "cid": format!("r{i}")}))
        .collect();
    let replies = c1.pipeline(frames, 32).await;
    assert!(
        replies.iter().all(|r| r["ok"] == json!(true)),
        "{replies:?}"
    );
    let r = ep
        .http()
        .delete(&format!("/v1/rooms/{room}/members/{bob}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let conv = dm(&alice, &bob);
    for (kind, seq) in [("delivered", n), ("read", n / 2), ("read", n)] {
        b1.ok("receipt", json!({"conv": conv, "kind": kind, "seq": seq}))
            .await;
    }
    c1.ok(
        "receipt",
        json!({"conv": room_conv, "kind": "read", "seq": n / 4}),
    )
    .await;
    a1.ok("presence", json!({"status": "busy"})).await;
    a1.ok("presence", json!({"status": "away"})).await;
    let r = ep
        .http()
        .post(
            &format!("/v1/users/{carol}/notices"),
            json!({"type": "invoice", "data": {"n": 7}}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let call = a1
        .ok("call.invite", json!({"to": [bob], "media": "video"}))
        .await["call"]
        .as_str()
        .unwrap()
        .to_string();
    b1.next_event("call.invite", |f| f["call"] == call).await;
    b1.ok("call.accept", json!({"call": call})).await;
    a1.next_event("call.accepted", |f| f["call"] == call).await;
    a1.ok("call.end", json!({"call": call})).await;
    b1.next_event("call.ended", |f| f["call"] == call).await;
    let call2 = a1
        .ok("call.invite", json!({"to": [carol], "media": "audio"}))
        .await["call"]
        .as_str()
        .unwrap()
        .to_string();
    c1.next_event("call.invite", |f| f["call"] == call2).await;
    c1.ok("call.reject", json!({"call": call2})).await;
    a1.next_event("call.ended", |f| f["call"] == call2).await;
    vec![a1, b1, c1]
}

// ---------------------------------------------------------------------------------------------
// the test bodies

async fn rows_match_the_log(mut db: TestDb) {
    let url = db.url.clone();
    let b = TestBroker::start_with(|c| {
        db.configure(c, &url);
        c.sync.batch_max = 64;
    })
    .await;
    let _clients = burst(&b, 200).await;
    let head = wait_synced(&b, db.sink).await;
    let cp = verify(&mut db, &b).await;
    assert!(cp >= head);
    // Invitees (not on /v1/events, whose `to` is the audience): one user per call here.
    for r in db.rows("SELECT invited, initiator FROM calls").await {
        let invited: Vec<String> = serde_json::from_str(r[0].as_deref().unwrap()).unwrap();
        assert_eq!(invited.len(), 1, "{r:?}");
        assert_ne!(Some(&invited[0]), r[1].as_ref(), "{r:?}");
    }
    let v: Vec<Vec<Option<String>>> = db
        .rows("SELECT version FROM switchboard_schema ORDER BY version")
        .await;
    assert_eq!(v, vec![vec![Some("1".to_string())]], "migrations recorded");
    let metrics = b.http_anonymous().get("/metrics").await.text;
    assert!(
        metrics.contains("switchboard_sync_lag_events"),
        "lag metric"
    );
    assert!(metrics.contains("switchboard_sync_state"), "state metric");
    drop(_clients);
    let mut b = b;
    b.shutdown().await;
    db.drop_place().await;
}

async fn kill_mid_sync_then_restart(mut db: TestDb) {
    let mut srv = ServerProcess::new();
    srv.extra_env = vec![
        (db.env_key().to_string(), db.url.clone()),
        ("SWITCHBOARD_SYNC__BATCH_MAX".into(), "16".into()),
        ("SWITCHBOARD_SYNC__BATCH_MS".into(), "1".into()),
        ("SWITCHBOARD_SYNC__RETRY_BASE_MS".into(), "50".into()),
        ("SWITCHBOARD_SYNC__RETRY_CAP_MS".into(), "300".into()),
    ];
    srv.start().await;
    let ep = srv.ep();
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = ep.connect(&alice, "a1").await;
    let replies = a1.pipeline(send_frames(&bob, "k", 600), 64).await;
    assert!(replies.iter().all(|r| r["ok"] == json!(true)));
    let at_kill = sink_stats(&ep, db.sink).await;
    srv.kill().await;
    eprintln!("killed with sink status {at_kill}");
    let cp_killed = checkpoint(&mut db).await;
    srv.start().await;
    let ep = srv.ep();
    let a1 = ep.connect(&alice, "a1").await;
    let replies = a1.pipeline(send_frames(&bob, "after", 100), 64).await;
    assert!(replies.iter().all(|r| r["ok"] == json!(true)));
    wait_synced(&ep, db.sink).await;
    let cp = verify(&mut db, &ep).await;
    assert!(cp >= cp_killed);
    let n = db.rows("SELECT COUNT(*) FROM messages").await;
    assert_eq!(n[0][0].as_deref(), Some("700"), "every message once");
    drop(a1);
    srv.kill().await;
    db.drop_place().await;
}

/// A TCP proxy in front of the database that can drop every connection and refuse new ones.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (c2, k2) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c2.load(Ordering::SeqCst) {
                    drop(inbound); // refused: closed at once
                    continue;
                }
                let up = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(&up).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                k2.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy {
            addr,
            cut,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

async fn outage_then_catch_up(mut db: TestDb) {
    let proxy = Proxy::start(db.upstream.clone()).await;
    let url = db.url_via(proxy.addr);
    let b = TestBroker::start_with(|c| {
        db.configure(c, &url);
        c.sync.batch_max = 50;
    })
    .await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let a1 = b.connect(&alice, "a1").await;
    let replies = a1.pipeline(send_frames(&bob, "pre", 20), 16).await;
    assert!(replies.iter().all(|r| r["ok"] == json!(true)));
    let before = wait_synced(&b, db.sink).await;

    proxy.cut();
    // The broker keeps acking while the database is unreachable.
    let replies = a1.pipeline(send_frames(&bob, "during", 300), 32).await;
    assert!(
        replies.iter().all(|r| r["ok"] == json!(true)),
        "acks continue"
    );
    let deadline = Instant::now() + SYNC_WAIT;
    let down = loop {
        let s = sink_stats(&b, db.sink).await;
        if s["state"] == "down" && s["lag"].as_u64().unwrap_or(0) >= 300 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "sink never reported down with lag: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(down["error"].is_string(), "{down}");
    assert_eq!(down["checkpoint"].as_u64(), Some(before), "{down}");
    let m = b.http_anonymous().get("/metrics").await.text;
    assert!(
        m.lines()
            .any(|l| l.starts_with("switchboard_sync_state") && l.contains(db.sink)),
        "state gauge exported"
    );
    // More while down: the lag grows.
    let replies = a1.pipeline(send_frames(&bob, "still", 50), 32).await;
    assert!(replies.iter().all(|r| r["ok"] == json!(true)));
    let s = sink_stats(&b, db.sink).await;
    assert!(s["lag"].as_u64().unwrap_or(0) >= 350, "lag grows: {s}");

    proxy.restore();
    wait_synced(&b, db.sink).await;
    verify(&mut db, &b).await;
    let n = db.rows("SELECT COUNT(*) FROM messages").await;
    assert_eq!(n[0][0].as_deref(), Some("370"));
    drop(a1);
    let mut b = b;
    b.shutdown().await;
    drop(proxy);
    db.drop_place().await;
}

async fn replay_from_zero_rebuilds(mut db: TestDb) {
    let mut srv = ServerProcess::new();
    srv.start().await;
    let ep = srv.ep();
    let clients = burst(&ep, 120).await;
    drop(clients);
    let events = all_events(&ep).await;
    srv.send_sigterm();
    let st = srv.wait_exit(Duration::from_secs(20)).await;
    assert!(st.success(), "{st}");
    let seen = events.last().map(off).unwrap_or(0);
    for round in 0..2 {
        let cmd = srv.command(
            &["sync", "--sink", db.sink, "--from", "0"],
            &[
                (db.env_key(), db.url.as_str()),
                ("SWITCHBOARD_SYNC__BATCH_MAX", "50"),
            ],
        );
        let (st, out, err) = run_to_end(cmd, Duration::from_secs(60)).await;
        assert!(st.success(), "sync round {round}: {st}\n{out}\n{err}");
        assert!(out.contains("replayed offsets 1..="), "{out}");
        // The stopped log also holds what the shutdown appended (presence offline).
        assert!(checkpoint(&mut db).await >= seen, "{out}");
    }
    srv.start().await;
    let ep = srv.ep();
    let cp = verify(&mut db, &ep).await;
    // Everything the stopped broker had (the restart adds nothing before `hello`s).
    assert_eq!(Some(cp), all_events(&ep).await.last().map(off));
    srv.kill().await;
    db.drop_place().await;
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL and SQL Server entry points

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_rows_match_the_log_after_a_burst() {
    if let Some(db) = TestDb::postgres("postgres_rows_match_the_log_after_a_burst").await {
        rows_match_the_log(db).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_kill_mid_sync_and_restart_leaves_no_duplicate_and_no_gap() {
    if let Some(db) = TestDb::postgres("postgres_kill_mid_sync").await {
        kill_mid_sync_then_restart(db).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_keeps_acks_flowing_and_the_lag_drains() {
    if let Some(db) = TestDb::postgres("postgres_outage").await {
        outage_then_catch_up(db).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_sync_from_zero_rebuilds_a_fresh_schema() {
    if let Some(db) = TestDb::postgres("postgres_sync_from_zero").await {
        replay_from_zero_rebuilds(db).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mssql_rows_match_the_log_after_a_burst() {
    if let Some(db) = TestDb::mssql("mssql_rows_match_the_log_after_a_burst").await {
        rows_match_the_log(db).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mssql_kill_mid_sync_and_restart_leaves_no_duplicate_and_no_gap() {
    if let Some(db) = TestDb::mssql("mssql_kill_mid_sync").await {
        kill_mid_sync_then_restart(db).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mssql_outage_keeps_acks_flowing_and_the_lag_drains() {
    if let Some(db) = TestDb::mssql("mssql_outage").await {
        outage_then_catch_up(db).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mssql_sync_from_zero_rebuilds_a_fresh_schema() {
    if let Some(db) = TestDb::mssql("mssql_sync_from_zero").await {
        replay_from_zero_rebuilds(db).await;
    }
}
