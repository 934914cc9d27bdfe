//! The push providers (FCM HTTP v1, APNs) against the local mocks of
//! `tests/common/push_mock.rs`: request shapes, credential caching and the
//! answer → [`Outcome`] classification of push-anchors.md section 3.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::push_mock::*;
use serde_json::Value;
use switchboard::push::provider::{Outcome, ProviderKind, PushMessage};
use switchboard::push::providers::Providers;
use tempfile::TempDir;

const FCM_TOKEN: &str = "fcm-token-0123456789abcdef";
const APNS_TOKEN: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn chat(provider: ProviderKind, token: &str) -> PushMessage {
    let mut data = BTreeMap::new();
    data.insert("type".to_string(), "chat".to_string());
    data.insert("conv".to_string(), "c-1".to_string());
    data.insert("seq".to_string(), "42".to_string());
    PushMessage {
        provider,
        app: None,
        token: token.to_string(),
        title: Some("Ann".into()),
        body: Some("hi there".into()),
        data,
        collapse_id: "m-123".into(),
        urgent: false,
        expires_at_ms: Some(now_ms() + 3_600_000),
    }
}

fn call(provider: ProviderKind, token: &str) -> PushMessage {
    let mut data = BTreeMap::new();
    data.insert("type".to_string(), "call".to_string());
    data.insert("call".to_string(), "call-7".to_string());
    PushMessage {
        provider,
        app: None,
        token: token.to_string(),
        title: None,
        body: None,
        data,
        collapse_id: "call-7".into(),
        urgent: true,
        expires_at_ms: None,
    }
}

struct Fcm {
    mock: FcmMock,
    providers: Providers,
    _dir: TempDir,
}

async fn fcm() -> Fcm {
    let dir = TempDir::new().expect("tempdir");
    let mock = FcmMock::start().await;
    let cfg = push_config(mock.config(vec![mock.app(dir.path(), "main")]), no_apns());
    let providers = Providers::from_config(&cfg).expect("providers");
    Fcm {
        mock,
        providers,
        _dir: dir,
    }
}

struct Apns {
    mock: ApnsMock,
    providers: Providers,
    _dir: TempDir,
}

async fn apns() -> Apns {
    let dir = TempDir::new().expect("tempdir");
    let mock = ApnsMock::start().await;
    let apps = vec![mock.app(dir.path(), "main")];
    let cfg = push_config(no_fcm(), mock.config(dir.path(), apps));
    let providers = Providers::from_config(&cfg).expect("providers");
    Apns {
        mock,
        providers,
        _dir: dir,
    }
}

// ------------------------------------------------------------------------------ FCM

#[tokio::test]
async fn fcm_sends_with_a_valid_assertion_and_caches_the_token() {
    let f = fcm().await;
    let msg = chat(ProviderKind::Fcm, FCM_TOKEN);
    assert_eq!(f.providers.send(&msg).await, Outcome::Sent);
    assert_eq!(f.providers.send(&msg).await, Outcome::Sent);
    assert_eq!(f.mock.assertion_errors(), Vec::<String>::new());
    assert_eq!(
        f.mock.token_requests().len(),
        1,
        "one access token for both sends"
    );

    let sends = f.mock.sends();
    assert_eq!(sends.len(), 2);
    let req = &sends[0];
    assert_eq!(
        req.path,
        format!("/v1/projects/{FCM_PROJECT_ID}/messages:send")
    );
    assert_eq!(req.header("authorization"), Some("Bearer ya29.test-1"));
    let m = &req.json.as_ref().expect("json body")["message"];
    assert_eq!(m["token"], FCM_TOKEN);
    assert_eq!(m["data"]["seq"], "42");
    assert_eq!(m["notification"]["title"], "Ann");
    assert_eq!(m["notification"]["body"], "hi there");
    assert_eq!(m["android"]["priority"], "HIGH");
    assert_eq!(m["android"]["collapse_key"], "m-123");
    let ttl = m["android"]["ttl"].as_str().expect("ttl");
    let secs: u64 = ttl.trim_end_matches('s').parse().expect("ttl seconds");
    assert!((3590..=3600).contains(&secs), "ttl {ttl}");
    assert_eq!(m["apns"]["headers"]["apns-collapse-id"], "m-123");
    assert_eq!(m["apns"]["headers"]["apns-push-type"], "alert");
}

#[tokio::test]
async fn fcm_call_is_data_only_and_high_priority() {
    let f = fcm().await;
    let mut msg = call(ProviderKind::Fcm, FCM_TOKEN);
    msg.expires_at_ms = Some(now_ms() + 30_000);
    assert_eq!(f.providers.send(&msg).await, Outcome::Sent);
    let sends = f.mock.sends();
    let m = &sends[0].json.as_ref().expect("json")["message"];
    assert!(m.get("notification").is_none());
    assert_eq!(m["data"]["call"], "call-7");
    assert_eq!(m["android"]["priority"], "HIGH");
    let ttl = m["android"]["ttl"].as_str().expect("ttl");
    assert!(ttl == "30s" || ttl == "29s", "ttl {ttl}");
}

#[tokio::test]
async fn fcm_concurrent_sends_share_one_token_request() {
    let f = fcm().await;
    let msg = chat(ProviderKind::Fcm, FCM_TOKEN);
    let sends = (0..10).map(|_| f.providers.send(&msg));
    let outcomes = futures_util::future::join_all(sends).await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Sent), "{outcomes:?}");
    assert_eq!(f.mock.token_requests().len(), 1);
}

#[tokio::test]
async fn fcm_unregistered_is_token_dead() {
    let f = fcm().await;
    f.mock.push_send(fcm_unregistered());
    let out = f.providers.send(&chat(ProviderKind::Fcm, FCM_TOKEN)).await;
    assert!(
        matches!(&out, Outcome::TokenDead { reason } if reason.contains("UNREGISTERED")),
        "{out:?}"
    );
}

#[tokio::test]
async fn fcm_sender_id_mismatch_is_token_dead() {
    let f = fcm().await;
    f.mock.push_send(fcm_sender_id_mismatch());
    let out = f.providers.send(&chat(ProviderKind::Fcm, FCM_TOKEN)).await;
    assert!(matches!(out, Outcome::TokenDead { .. }), "{out:?}");
}

#[tokio::test]
async fn fcm_invalid_argument_on_the_token_is_token_dead() {
    let f = fcm().await;
    f.mock.push_send(fcm_invalid_token());
    let out = f.providers.send(&chat(ProviderKind::Fcm, FCM_TOKEN)).await;
    assert!(matches!(out, Outcome::TokenDead { .. }), "{out:?}");
}

#[tokio::test]
async fn fcm_other_invalid_argument_is_rejected() {
    let f = fcm().await;
    f.mock.push_send(fcm_invalid_payload());
    let out = f.providers.send(&chat(ProviderKind::Fcm, FCM_TOKEN)).await;
    assert!(
        matches!(&out, Outcome::Rejected { reason } if reason.contains("INVALID_ARGUMENT")),
        "{out:?}"
    );
}

#[tokio::test]
async fn fcm_quota_exceeded_throttles_for_retry_after() {
    let f = fcm().await;
    f.mock.push_send(fcm_quota_exceeded(Some("17")));
    f.mock.push_send(fcm_quota_exceeded(None));
    let msg = chat(ProviderKind::Fcm, FCM_TOKEN);
    let out = f.providers.send(&msg).await;
    assert!(
        matches!(out, Outcome::Throttled { after, .. } if after == Duration::from_secs(17)),
        "{out:?}"
    );
    let out = f.providers.send(&msg).await;
    assert!(
        matches!(out, Outcome::Throttled { after, .. } if after == Duration::from_secs(60)),
        "default 60 s: {out:?}"
    );
}

#[tokio::test]
async fn fcm_html_5xx_is_retry() {
    let f = fcm().await;
    f.mock
        .push_send(google_html_error(503).header("retry-after", "5"));
    f.mock.push_send(google_html_error(502));
    f.mock.push_send(fcm_unavailable());
    let msg = chat(ProviderKind::Fcm, FCM_TOKEN);
    let out = f.providers.send(&msg).await;
    assert!(
        matches!(out, Outcome::Retry { after: Some(a), .. } if a == Duration::from_secs(5)),
        "{out:?}"
    );
    let out = f.providers.send(&msg).await;
    assert!(matches!(out, Outcome::Retry { after: None, .. }), "{out:?}");
    let out = f.providers.send(&msg).await;
    assert!(matches!(out, Outcome::Retry { .. }), "{out:?}");
}

#[tokio::test]
async fn fcm_invalid_grant_is_auth_failed() {
    let f = fcm().await;
    f.mock.push_token(oauth_invalid_grant());
    let out = f.providers.send(&chat(ProviderKind::Fcm, FCM_TOKEN)).await;
    assert!(
        matches!(&out, Outcome::AuthFailed { reason } if reason.contains("invalid_grant")),
        "{out:?}"
    );
    assert!(f.mock.sends().is_empty(), "nothing sent without a token");
}

#[tokio::test]
async fn fcm_401_refreshes_the_token_once() {
    let f = fcm().await;
    let msg = chat(ProviderKind::Fcm, FCM_TOKEN);
    assert_eq!(f.providers.send(&msg).await, Outcome::Sent);
    f.mock.revoke_tokens();
    assert_eq!(f.providers.send(&msg).await, Outcome::Sent);
    assert_eq!(f.mock.token_requests().len(), 2);

    // 401 again with the new token too: AuthFailed, not a loop.
    f.mock.push_send(fcm_unauthenticated());
    f.mock.push_send(fcm_unauthenticated());
    let out = f.providers.send(&msg).await;
    assert!(matches!(out, Outcome::AuthFailed { .. }), "{out:?}");
    assert_eq!(f.mock.token_requests().len(), 3);
}

#[tokio::test]
async fn fcm_third_party_auth_and_permission_denied_are_auth_failed() {
    let f = fcm().await;
    f.mock.push_send(fcm_third_party_auth_error());
    f.mock.push_send(fcm_permission_denied());
    let msg = chat(ProviderKind::Fcm, FCM_TOKEN);
    let out = f.providers.send(&msg).await;
    assert!(
        matches!(&out, Outcome::AuthFailed { reason } if reason.contains("THIRD_PARTY_AUTH_ERROR")),
        "{out:?}"
    );
    let out = f.providers.send(&msg).await;
    assert!(matches!(out, Outcome::AuthFailed { .. }), "{out:?}");
    assert_eq!(f.mock.token_requests().len(), 1, "no refresh for these");
}

#[tokio::test]
async fn fcm_oversized_notification_is_truncated() {
    let f = fcm().await;
    let mut msg = chat(ProviderKind::Fcm, FCM_TOKEN);
    msg.body = Some("ü".repeat(6000));
    assert_eq!(f.providers.send(&msg).await, Outcome::Sent);
    let sends = f.mock.sends();
    assert!(sends[0].body.len() <= 4096, "{} bytes", sends[0].body.len());
    let body = sends[0].json.as_ref().expect("json")["message"]["notification"]["body"]
        .as_str()
        .expect("body")
        .to_string();
    assert!(body.ends_with('…') && body.len() > 1000);
}

// ----------------------------------------------------------------------------- APNs

fn apns_body(rec: &common::push_mock::Recorded) -> Value {
    rec.json.clone().expect("json body")
}

#[tokio::test]
async fn apns_alert_carries_the_documented_headers() {
    let a = apns().await;
    let msg = chat(ProviderKind::Apns, APNS_TOKEN);
    assert_eq!(a.providers.send(&msg).await, Outcome::Sent);
    let reqs = a.mock.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.version, "HTTP/2.0");
    assert_eq!(r.path, format!("/3/device/{APNS_TOKEN}"));
    assert!(r
        .header("authorization")
        .is_some_and(|v| v.starts_with("bearer ")));
    assert_eq!(r.header("apns-topic"), Some(APNS_TOPIC));
    assert_eq!(r.header("apns-push-type"), Some("alert"));
    assert_eq!(r.header("apns-priority"), Some("10"));
    assert_eq!(r.header("apns-collapse-id"), Some("m-123"));
    let expected = msg
        .expires_at_ms
        .expect("expiry")
        .div_ceil(1000)
        .to_string();
    assert_eq!(r.header("apns-expiration"), Some(expected.as_str()));
    let body = apns_body(r);
    assert_eq!(body["aps"]["alert"]["title"], "Ann");
    assert_eq!(body["aps"]["alert"]["body"], "hi there");
    assert_eq!(body["aps"]["sound"], "default");
    assert_eq!(body["conv"], "c-1");
}

#[tokio::test]
async fn apns_voip_uses_the_voip_topic_type_and_no_storage() {
    let a = apns().await;
    let msg = call(ProviderKind::ApnsVoip, APNS_TOKEN);
    assert_eq!(a.providers.send(&msg).await, Outcome::Sent);
    let reqs = a.mock.requests();
    let r = &reqs[0];
    assert_eq!(
        r.header("apns-topic"),
        Some(format!("{APNS_TOPIC}.voip").as_str())
    );
    assert_eq!(r.header("apns-push-type"), Some("voip"));
    assert_eq!(r.header("apns-priority"), Some("10"));
    assert_eq!(r.header("apns-expiration"), Some("0"));
    assert_eq!(r.header("apns-collapse-id"), Some("call-7"));
    assert_eq!(apns_body(r)["call"], "call-7");

    // With a ring deadline, the expiration is that deadline.
    let mut msg = call(ProviderKind::ApnsVoip, APNS_TOKEN);
    msg.expires_at_ms = Some(now_ms() + 30_000);
    assert_eq!(a.providers.send(&msg).await, Outcome::Sent);
    let expected = msg
        .expires_at_ms
        .expect("expiry")
        .div_ceil(1000)
        .to_string();
    assert_eq!(
        a.mock.requests()[1].header("apns-expiration"),
        Some(expected.as_str())
    );
}

#[tokio::test]
async fn apns_data_only_is_background_priority_5() {
    let a = apns().await;
    let mut msg = call(ProviderKind::Apns, APNS_TOKEN);
    msg.urgent = false;
    assert_eq!(a.providers.send(&msg).await, Outcome::Sent);
    let r = &a.mock.requests()[0];
    assert_eq!(r.header("apns-push-type"), Some("background"));
    assert_eq!(r.header("apns-priority"), Some("5"));
    assert_eq!(apns_body(r)["aps"]["content-available"], 1);
}

#[tokio::test]
async fn apns_410_is_token_dead() {
    let a = apns().await;
    a.mock.push(apns_unregistered(1_700_000_000_000));
    let out = a
        .providers
        .send(&chat(ProviderKind::Apns, APNS_TOKEN))
        .await;
    assert!(
        matches!(&out, Outcome::TokenDead { reason } if reason.contains("Unregistered")),
        "{out:?}"
    );
    a.mock.push(apns_error(400, "BadDeviceToken"));
    let out = a
        .providers
        .send(&chat(ProviderKind::Apns, APNS_TOKEN))
        .await;
    assert!(matches!(out, Outcome::TokenDead { .. }), "{out:?}");
}

#[tokio::test]
async fn apns_bad_topic_is_rejected() {
    let a = apns().await;
    a.mock.push(apns_error(400, "BadTopic"));
    let out = a
        .providers
        .send(&chat(ProviderKind::Apns, APNS_TOKEN))
        .await;
    assert!(
        matches!(&out, Outcome::Rejected { reason } if reason.contains("BadTopic")),
        "{out:?}"
    );
}

#[tokio::test]
async fn apns_invalid_provider_token_is_auth_failed() {
    let a = apns().await;
    a.mock.push(apns_error(403, "InvalidProviderToken"));
    let out = a
        .providers
        .send(&chat(ProviderKind::Apns, APNS_TOKEN))
        .await;
    assert!(matches!(out, Outcome::AuthFailed { .. }), "{out:?}");
    assert_eq!(a.mock.requests().len(), 1, "no retry");
}

#[tokio::test]
async fn apns_expired_provider_token_regenerates_and_succeeds() {
    let a = apns().await;
    a.mock.push(apns_error(403, "ExpiredProviderToken"));
    let out = a
        .providers
        .send(&chat(ProviderKind::Apns, APNS_TOKEN))
        .await;
    assert_eq!(out, Outcome::Sent);
    assert_eq!(a.mock.requests().len(), 2);
    assert_eq!(a.mock.jwts().len(), 2, "a new JWT for the retry");

    // Twice in a row: AuthFailed, no loop.
    a.mock.push(apns_error(403, "ExpiredProviderToken"));
    a.mock.push(apns_error(403, "ExpiredProviderToken"));
    let out = a
        .providers
        .send(&chat(ProviderKind::Apns, APNS_TOKEN))
        .await;
    assert!(matches!(out, Outcome::AuthFailed { .. }), "{out:?}");
    assert_eq!(a.mock.requests().len(), 4);
}

#[tokio::test]
async fn apns_jwt_is_not_regenerated_per_request() {
    let a = apns().await;
    for _ in 0..5 {
        assert_eq!(
            a.providers
                .send(&chat(ProviderKind::Apns, APNS_TOKEN))
                .await,
            Outcome::Sent
        );
    }
    assert_eq!(a.mock.requests().len(), 5);
    assert_eq!(a.mock.jwts().len(), 1);
}

#[tokio::test]
async fn apns_retryable_answers() {
    let a = apns().await;
    a.mock.push(apns_error(429, "TooManyRequests"));
    a.mock
        .push(apns_error(503, "ServiceUnavailable").header("retry-after", "3"));
    a.mock.push(apns_error(500, "InternalServerError"));
    let msg = chat(ProviderKind::Apns, APNS_TOKEN);
    for _ in 0..3 {
        let out = a.providers.send(&msg).await;
        assert!(matches!(out, Outcome::Retry { .. }), "{out:?}");
    }
}

#[tokio::test]
async fn apns_oversized_payload_is_truncated_not_refused() {
    let a = apns().await;
    let mut msg = chat(ProviderKind::Apns, APNS_TOKEN);
    msg.body = Some("\"quoted\" ".repeat(2000));
    msg.collapse_id = "x".repeat(200);
    assert_eq!(a.providers.send(&msg).await, Outcome::Sent);
    let mut voip = call(ProviderKind::ApnsVoip, APNS_TOKEN);
    voip.body = Some("long ".repeat(3000));
    assert_eq!(a.providers.send(&voip).await, Outcome::Sent);

    let reqs = a.mock.requests();
    assert!(reqs[0].body.len() <= 4096 && reqs[0].body.len() > 3500);
    assert!(reqs[0]
        .header("apns-collapse-id")
        .is_some_and(|c| c.len() <= 64));
    let text = apns_body(&reqs[0])["aps"]["alert"]["body"]
        .as_str()
        .expect("body")
        .to_string();
    assert!(text.ends_with('…'));
    assert!(reqs[1].body.len() <= 5120 && reqs[1].body.len() > 4096);
}

// ------------------------------------------------------------------------ Providers

#[tokio::test]
async fn unknown_or_missing_app_is_auth_failed() {
    let f = fcm().await;
    assert!(f.providers.configured(ProviderKind::Fcm));
    assert!(!f.providers.configured(ProviderKind::Apns));
    assert!(!f.providers.configured(ProviderKind::ApnsVoip));

    let mut msg = chat(ProviderKind::Fcm, FCM_TOKEN);
    msg.app = Some("other".into());
    let out = f.providers.send(&msg).await;
    assert!(matches!(out, Outcome::AuthFailed { .. }), "{out:?}");
    msg.app = Some("main".into());
    assert_eq!(f.providers.send(&msg).await, Outcome::Sent);

    let out = f
        .providers
        .send(&chat(ProviderKind::Apns, APNS_TOKEN))
        .await;
    assert!(
        matches!(&out, Outcome::AuthFailed { reason } if reason.contains("no app configured")),
        "{out:?}"
    );
}

#[tokio::test]
async fn config_errors_name_the_key() {
    let dir = TempDir::new().expect("tempdir");
    let mock = FcmMock::start().await;
    let mut app = mock.app(dir.path(), "main");
    app.service_account = dir
        .path()
        .join("missing.json")
        .to_string_lossy()
        .into_owned();
    let cfg = push_config(mock.config(vec![app]), no_apns());
    let err = Providers::from_config(&cfg).expect_err("missing file");
    assert_eq!(err.key(), "push.fcm.apps[0].service_account");

    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, br#"{"project_id": "p", "client_email": "e", "private_key": "nope", "token_uri": "http://x"}"#)
        .expect("write");
    let app = switchboard::config::FcmApp {
        name: "main".into(),
        service_account: bad.to_string_lossy().into_owned(),
    };
    let cfg = push_config(mock.config(vec![app]), no_apns());
    let err = Providers::from_config(&cfg).expect_err("bad key");
    assert_eq!(err.key(), "push.fcm.apps[0].service_account");

    let amock = ApnsMock::start().await;
    let mut a = amock.app(dir.path(), "ios");
    let p8 = dir.path().join("bad.p8");
    std::fs::write(
        &p8,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    a.key_file = p8.to_string_lossy().into_owned();
    let cfg = push_config(no_fcm(), amock.config(dir.path(), vec![a]));
    let err = Providers::from_config(&cfg).expect_err("bad p8");
    assert_eq!(err.key(), "push.apns.apps[0].key_file");

    let a = amock.app(dir.path(), "ios");
    let mut apns_cfg = amock.config(dir.path(), vec![a.clone(), a]);
    let cfg = push_config(no_fcm(), apns_cfg.clone());
    let err = Providers::from_config(&cfg).expect_err("duplicate name");
    assert_eq!(err.key(), "push.apns.apps[1].name");

    apns_cfg.apps.truncate(1);
    apns_cfg.ca_cert = dir.path().join("nope.pem").to_string_lossy().into_owned();
    let err = Providers::from_config(&push_config(no_fcm(), apns_cfg)).expect_err("ca");
    assert_eq!(err.key(), "push.apns.ca_cert");
}
