//! Authentication and authorization edges (issue 9, item 4): algorithm confusion both ways
//! (an HS256 token signed with the RS256 public key, an RS256 token at an HS256 broker),
//! `alg: none` against a public key, expiry one second beyond the leeway, `aud` / `iss`
//! wrong or missing when configured, tokens of a user the backend disconnected (refused
//! after the disconnect, also after a restart), a room member who left loses the history,
//! the API key compared whole, and no token, secret or key in any log line.
//!
//! Neighbours: tests/session.rs has expired, wrongly signed, `alg: none` (HS256), missing
//! `exp`/`sub` and garbage tokens; tests/messaging.rs and tests/calls.rs have the
//! non-member history and call signal refusals.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn rs256(claims: &Value) -> String {
    let pem = std::fs::read(fixture("jwt_rs256_private.pem")).unwrap();
    encode(
        &Header::new(Algorithm::RS256),
        claims,
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap()
}

/// HS256 with an arbitrary byte key (the public key PEM, in the confusion attack).
fn hs256_bytes(key: &[u8], claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(key),
    )
    .unwrap()
}

/// Hello with `token`: `Ok(client)` on success, else the error code after checking the
/// 4001 close.
async fn hello_with(b: &TestBroker, token: &str) -> Result<Client, String> {
    let c = b.open().await;
    let r = c
        .request_frame(json!({"op": "hello", "id": 1, "token": token, "device": "d1"}))
        .await;
    if r["ok"] == json!(true) {
        return Ok(c);
    }
    let code = r["error"]["code"].as_str().unwrap_or("?").to_string();
    assert_eq!(c.wait_closed().await, Some(4001), "refused hello: {r}");
    Err(code)
}

async fn assert_refused(b: &TestBroker, token: &str, what: &str) {
    match hello_with(b, token).await {
        Ok(_) => panic!("{what}: the token was accepted"),
        Err(code) => assert_eq!(code, "unauthorized", "{what}"),
    }
}

async fn assert_accepted(b: &TestBroker, token: &str, what: &str) {
    if let Err(code) = hello_with(b, token).await {
        panic!("{what}: refused with {code}");
    }
}

// ---------------------------------------------------------------------------------------------
// algorithms

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_an_rs256_key_hs256_tokens_are_refused_even_when_signed_with_the_public_key() {
    let public = fixture("jwt_rs256_public.pem");
    let b = TestBroker::start_with(|c| {
        c.auth.jwt_public_key = public.display().to_string();
    })
    .await;
    let claims = claims(&uid("alice"), 600);
    assert_accepted(&b, &rs256(&claims), "a good RS256 token").await;
    // the classic confusion: the public key (known to all) used as an HMAC secret
    let pem = std::fs::read(&public).unwrap();
    assert_refused(
        &b,
        &hs256_bytes(&pem, &claims),
        "HS256 keyed with the public key",
    )
    .await;
    // and the broker's own HS256 secret no longer counts either
    assert_refused(&b, &mint(&b.secret, &claims), "HS256 with auth.jwt_secret").await;
    assert_refused(&b, &unsigned_token(&claims), "alg none").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_an_hs256_secret_rs256_tokens_are_refused() {
    let b = TestBroker::start().await;
    let claims = claims(&uid("alice"), 600);
    assert_accepted(&b, &mint(&b.secret, &claims), "a good HS256 token").await;
    assert_refused(&b, &rs256(&claims), "a validly signed RS256 token").await;
}

// ---------------------------------------------------------------------------------------------
// expiry, audience, issuer

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_expired_one_second_beyond_the_leeway_is_refused_and_within_it_accepted() {
    let b = TestBroker::start_with(|c| c.auth.leeway_s = 30).await;
    let user = uid("alice");
    // exp = now - leeway - 1: one second too old whatever the clock does next
    let late = mint(&b.secret, &json!({"sub": user, "exp": now_s() - 31}));
    assert_refused(&b, &late, "expired leeway + 1 s ago").await;
    // well within the leeway (10 s of margin for a slow machine)
    let inside = mint(&b.secret, &json!({"sub": user, "exp": now_s() - 20}));
    assert_accepted(&b, &inside, "expired 20 s ago with a 30 s leeway").await;
}

/// `nbf` was not checked at all before 2026-12-06 (jsonwebtoken leaves it off by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_not_yet_valid_beyond_the_leeway_is_refused_and_within_it_accepted() {
    let b = TestBroker::start_with(|c| c.auth.leeway_s = 30).await;
    let user = uid("nina");
    let exp = now_s() + 3600;
    let early = mint(
        &b.secret,
        &json!({"sub": user, "exp": exp, "nbf": now_s() + 60}),
    );
    assert_refused(&b, &early, "valid from a minute from now").await;
    let inside = mint(
        &b.secret,
        &json!({"sub": user, "exp": exp, "nbf": now_s() + 20}),
    );
    assert_accepted(&b, &inside, "valid from 20 s from now with a 30 s leeway").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_configured_audience_and_issuer_must_be_present_and_match() {
    let b = TestBroker::start_with(|c| {
        c.auth.audience = "switchboard".into();
        c.auth.issuer = "https://id.example.test".into();
    })
    .await;
    let good = json!({
        "sub": uid("alice"), "exp": now_s() + 600,
        "aud": "switchboard", "iss": "https://id.example.test",
    });
    assert_accepted(&b, &mint(&b.secret, &good), "right aud and iss").await;
    for (key, wrong) in [("aud", "another-service"), ("iss", "https://evil.example")] {
        let mut c = good.clone();
        c[key] = json!(wrong);
        assert_refused(&b, &mint(&b.secret, &c), &format!("wrong {key}")).await;
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove(key);
        assert_refused(&b, &mint(&b.secret, &c), &format!("no {key}")).await;
    }
}

// ---------------------------------------------------------------------------------------------
// backend disconnect revokes earlier tokens

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_issued_before_a_disconnect_are_refused_afterwards_also_after_a_restart() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let issued_before = mint(
        &b.secret,
        &json!({"sub": alice, "iat": now_s() - 5, "exp": now_s() + 600}),
    );
    let no_iat = mint(&b.secret, &json!({"sub": alice, "exp": now_s() + 600}));
    let a = hello_with(&b, &issued_before)
        .await
        .expect("accepted before");
    let bob_before = b.token(&bob);

    let r = b
        .http()
        .post(
            &format!("/v1/users/{alice}/disconnect"),
            json!({"reason": "account suspended"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(a.wait_closed().await, Some(4003));

    assert_refused(&b, &issued_before, "issued before the disconnect").await;
    assert_refused(&b, &no_iat, "no iat after a disconnect").await;
    // other users are not affected; a token issued now is fine
    assert_accepted(&b, &bob_before, "another user's token").await;
    assert_accepted(&b, &b.token(&alice), "a token issued after the disconnect").await;

    // durable: a `tokens.revoked` event in the log, and the same answers after a restart
    let ev = b
        .http()
        .get("/v1/events?after=0&limit=1000&types=tokens.revoked")
        .await;
    assert_eq!(ev.status, 200, "{}", ev.text);
    let lines: Vec<Value> = ev
        .text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{}", ev.text);
    assert_eq!(lines[0]["user"], json!(alice));
    assert_eq!(lines[0]["reason"], json!("account suspended"));
    assert_eq!(lines[0]["to"], json!([]), "never sent to a socket");
    let b = b.restart().await;
    assert_refused(&b, &issued_before, "issued before, after a restart").await;
    assert_accepted(&b, &b.token(&alice), "a new token after a restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_with_a_token_issued_before_a_disconnect_is_refused() {
    let b = TestBroker::start().await;
    let alice = uid("alice");
    let issued_before = mint(
        &b.secret,
        &json!({"sub": alice, "iat": now_s() - 5, "exp": now_s() + 600}),
    );
    let r = b
        .http()
        .post(&format!("/v1/users/{alice}/disconnect"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // A session opened after the disconnect, with a new token, tries to extend itself
    // with the revoked one.
    let a = hello_with(&b, &b.token(&alice))
        .await
        .expect("a new token is accepted");
    let reply = a
        .err("refresh", json!({"token": issued_before}), "unauthorized")
        .await;
    assert!(
        reply["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("disconnected")),
        "{reply}"
    );
    // A current token still refreshes, and the session stays open.
    let ok = a.ok("refresh", json!({"token": b.token(&alice)})).await;
    assert!(ok["exp"].as_u64().is_some(), "{ok}");
}

// ---------------------------------------------------------------------------------------------
// membership

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_who_left_a_room_can_no_longer_read_or_send_there() {
    let b = TestBroker::start().await;
    let (alice, bob) = (uid("alice"), uid("bob"));
    let room = b.http().create_room("r", &[&alice, &bob]).await;
    let conv = format!("room:{room}");
    let a = b.connect(&alice, "a1").await;
    let bc = b.connect(&bob, "b1").await;
    a.ok("send", json!({"conv": conv, "body": "one", "cid": "c1"}))
        .await;
    bc.ok("history", json!({"conv": conv})).await;
    let r = b
        .http()
        .delete(&format!("/v1/rooms/{room}/members/{bob}"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    bc.next_where("room.member", "change", "left").await;
    bc.err("history", json!({"conv": conv}), "forbidden").await;
    bc.err(
        "send",
        json!({"conv": conv, "body": "x", "cid": "c2"}),
        "forbidden",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// API key

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_whole_api_key_opens_the_api() {
    let b = TestBroker::start().await;
    let key = b.api_key.clone();
    let near_misses = [
        key[..key.len() - 1].to_string(),
        format!("{key}x"),
        key.to_uppercase(),
        format!(
            "{}{}",
            &key[..key.len() - 1],
            if key.ends_with('0') { '1' } else { '0' }
        ),
        String::new(),
    ];
    for k in near_misses {
        let r = b.http().with_key(&k).get("/v1/stats").await;
        r.assert_error(401, "unauthorized");
    }
    assert_eq!(b.http().get("/v1/stats").await.status, 200);
}

// ---------------------------------------------------------------------------------------------
// logs

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_token_secret_or_api_key_appears_in_the_log_even_at_trace_level() {
    let mut s = ServerProcess::new();
    s.extra_env
        .push(("SWITCHBOARD_LOGGING__LEVEL".into(), "trace".into()));
    s.start().await;
    let ep = s.ep();
    let (alice, bob) = (uid("alice"), uid("bob"));
    let good = ep.token(&alice);
    let forged = mint("not-the-secret-not-the-secret-xx", &claims(&alice, 600));
    let expired = mint(&ep.secret, &claims(&alice, -600));
    let refresh = ep.token(&alice);
    let wrong_key = format!("wrong-{}", uid("key"));

    // hellos: good, forged, expired; a refresh; the Authorization header on the upgrade
    let a = ep
        .connect_with(&alice, ConnectOpts::device("a1").token(good.clone()))
        .await;
    a.ok("refresh", json!({"token": refresh})).await;
    a.err("refresh", json!({"token": forged}), "unauthorized")
        .await;
    for t in [&forged, &expired] {
        let c = ep.open().await;
        let r = c
            .request_frame(json!({"op": "hello", "id": 1, "token": t, "device": "x"}))
            .await;
        assert_error(&r, "unauthorized");
    }
    let header_token = ep.token(&bob);
    let opts = OpenOpts {
        protocols: vec![JSON_PROTO.to_string()],
        headers: vec![(
            "Authorization".to_string(),
            format!("Bearer {header_token}"),
        )],
        ..Default::default()
    };
    let mut c = ep.open_with(opts).await.expect("upgrade");
    c.hello(None, "b1", None).await;

    // API calls with the key, with a wrong key, and a disconnect
    assert_eq!(ep.http().get("/v1/stats").await.status, 200);
    ep.http()
        .with_key(&wrong_key)
        .get("/v1/stats")
        .await
        .assert_error(401, "unauthorized");
    let r = ep
        .http()
        .post(&format!("/v1/users/{alice}/disconnect"), json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    a.wait_closed().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let log = s.log();
    assert!(
        log.contains("hello refused") || log.contains(&alice),
        "the log did not capture the session at trace level:\n{log}"
    );
    let secrets = [
        ("the JWT secret", ep.secret.as_str()),
        ("the API key", ep.api_key.as_str()),
        ("a wrong API key", wrong_key.as_str()),
        ("a hello token", good.as_str()),
        ("a forged token", forged.as_str()),
        ("an expired token", expired.as_str()),
        ("a refresh token", refresh.as_str()),
        ("an upgrade header token", header_token.as_str()),
    ];
    for (what, secret) in secrets {
        // a signature alone (the last part of a JWT) would give a token away too
        let needle = secret.rsplit('.').next().unwrap_or(secret);
        assert!(
            !log.contains(needle),
            "{what} appears in the log:\n{}",
            log.lines()
                .filter(|l| l.contains(needle))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    s.kill().await;
}
