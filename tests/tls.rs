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
