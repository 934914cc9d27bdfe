//! TLS: with `tls.cert`/`tls.key` set the listener speaks TLS only; a client that trusts
//! the certificate gets `/health`, a plain-text client gets nothing.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use switchboard::{Broker, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn tls_broker(dir: &std::path::Path) -> (Broker, CertificateDer<'static>) {
    // The development certificate comes from the real `gen-cert` command.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["gen-cert", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the private key must not be world-readable"
    );
    let mut cfg = Config::embedded();
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.storage.dir = dir.join("data");
    cfg.tls.cert = cert_path.display().to_string();
    cfg.tls.key = key_path.display().to_string();
    let broker = Broker::start(cfg).await.unwrap();
    (broker, CertificateDer::from_pem_file(&cert_path).unwrap())
}

#[tokio::test]
async fn health_answers_over_tls_with_a_trusted_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, der) = tls_broker(dir.path()).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(broker.local_addr()).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (_, conn) = tls.get_ref();
    assert!(matches!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3) | Some(rustls::ProtocolVersion::TLSv1_2)
    ));
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"status\":\"ok\""), "{text}");
    broker.shutdown().await;
}

#[tokio::test]
async fn a_plain_text_request_to_a_tls_listener_gets_no_http_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _) = tls_broker(dir.path()).await;
    let mut tcp = TcpStream::connect(broker.local_addr()).await.unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    assert!(!String::from_utf8_lossy(&out).contains("HTTP/1.1 200"));
    broker.shutdown().await;
}

#[test]
fn a_missing_certificate_file_is_a_config_error_naming_the_key() {
    let mut cfg = Config::embedded();
    cfg.tls.cert = "/nonexistent/cert.pem".into();
    cfg.tls.key = "/nonexistent/key.pem".into();
    let err = match switchboard::gateway::tls::acceptor(&cfg.tls) {
        Ok(_) => panic!("a missing file was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("tls.cert"), "{err}");
}

/// A raw ClientHello offering exactly `version` (no `supported_versions` extension, so the
/// legacy version field is the only offer) and `suites`, with the extensions a TLS 1.2
/// ECDHE handshake needs.
fn client_hello(version: u16, suites: &[u16]) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
    }
    let mut exts = Vec::new();
    // supported_groups: x25519, secp256r1
    ext(&mut exts, 0x000a, &[0x00, 0x04, 0x00, 0x1d, 0x00, 0x17]);
    // ec_point_formats: uncompressed
    ext(&mut exts, 0x000b, &[0x01, 0x00]);
    // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256, rsa_pkcs1_sha256
    ext(
        &mut exts,
        0x000d,
        &[0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01],
    );
    // renegotiation_info (empty), extended_master_secret
    ext(&mut exts, 0xff01, &[0x00]);
    ext(&mut exts, 0x0017, &[]);

    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);

    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// Sends `hello` and returns the first record's content type and its first bytes.
async fn first_record(addr: std::net::SocketAddr, hello: &[u8]) -> (u8, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(hello).await.unwrap();
    let mut head = [0u8; 5];
    tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_exact(&mut head))
        .await
        .expect("an answer to the ClientHello")
        .expect("a TLS record");
    let len = u16::from_be_bytes([head[3], head[4]]) as usize;
    let mut payload = vec![0u8; len.min(64)];
    tcp.read_exact(&mut payload).await.unwrap();
    (head[0], payload)
}

#[tokio::test]
async fn a_client_offering_only_tls_1_1_or_1_0_is_refused_with_protocol_version() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _) = tls_broker(dir.path()).await;
    let addr = broker.local_addr();
    // the same hello with version 1.2 and its AEAD suites gets a ServerHello for 1.2: the
    // refusals below are about the version, not a malformed hello
    let modern = [0xc02b, 0xc02f, 0xcca9, 0xcca8, 0xc02c, 0xc030];
    let (kind, payload) = first_record(addr, &client_hello(0x0303, &modern)).await;
    assert_eq!(kind, 0x16, "not a handshake record: {payload:?}");
    assert_eq!(payload[0], 0x02, "not a ServerHello: {payload:?}");
    assert_eq!(&payload[4..6], &[0x03, 0x03], "ServerHello not for TLS 1.2");

    // TLS 1.1 and 1.0 with their CBC suites (and the modern ones too): a fatal
    // protocol_version alert, never a ServerHello
    let legacy = [0xc009, 0xc013, 0x002f, 0x0035, 0xc02b, 0xc02f];
    for version in [0x0302u16, 0x0301] {
        let (kind, payload) = first_record(addr, &client_hello(version, &legacy)).await;
        assert_eq!(kind, 0x15, "{version:#06x}: not an alert: {payload:?}");
        assert_eq!(
            payload[..2],
            [2, 70],
            "{version:#06x}: not a fatal protocol_version alert"
        );
    }
    broker.shutdown().await;
}
