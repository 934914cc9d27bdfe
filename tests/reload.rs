//! SIGHUP: the real binary re-reads its config file and applies what can change live (the
//! TLS certificate files and the log level) without dropping connections; an invalid file
//! changes nothing and the broker keeps serving.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn gen_cert(dir: &std::path::Path) -> CertificateDer<'static> {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["gen-cert", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    CertificateDer::from_pem_file(dir.join("cert.pem")).unwrap()
}

fn write_config(path: &std::path::Path, dir: &std::path::Path, level: &str) {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\ndir = \"{data}\"\n[tls]\ncert = \"{c}\"\nkey = \"{k}\"\n[logging]\nlevel = \"{level}\"\n",
        data = dir.join("data").display(),
        c = dir.join("cert.pem").display(),
        k = dir.join("key.pem").display(),
    );
    std::fs::write(path, text).unwrap();
}

/// Every stdout line of the child, as it comes.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_line(rx: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(_) => {}
            Err(_) => panic!("no log line containing {needle:?}"),
        }
    }
}

fn connector(trusted: &CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(addr: &str, trusted: &CertificateDer<'static>) -> std::io::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    connector(trusted)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// One keep-alive `GET /health` on an open connection; returns the status line.
async fn health(s: &mut Tls) -> String {
    s.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("no answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

fn hup(child: &Child) {
    let ok = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_certificate_and_level_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let cert_a = gen_cert(dir.path());
    let config = dir.path().join("switchboard.toml");
    write_config(&config, dir.path(), "info");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines(&mut child);
    let line = wait_line(&rx, "listening");
    let addr = line
        .split("addr=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_string();

    let mut old = tls_connect(&addr, &cert_a).await.unwrap();
    assert!(health(&mut old).await.starts_with("HTTP/1.1 200"));

    // new certificate files at the same paths, a new level, then SIGHUP
    let cert_b = gen_cert(dir.path());
    assert_ne!(cert_a, cert_b);
    write_config(&config, dir.path(), "debug");
    hup(&child);
    let done = wait_line(&rx, "configuration reloaded");
    assert!(
        done.contains("tls") && done.contains("logging.level"),
        "{done}"
    );

    // new connections get the new certificate, the old connection goes on
    let mut new = tls_connect(&addr, &cert_b).await.unwrap();
    assert!(health(&mut new).await.starts_with("HTTP/1.1 200"));
    assert!(
        tls_connect(&addr, &cert_a).await.is_err(),
        "the old certificate is still served to new connections"
    );
    assert!(
        health(&mut old).await.starts_with("HTTP/1.1 200"),
        "a live connection was dropped"
    );

    // an invalid file changes nothing
    std::fs::write(&config, "[nosuch]\nkey = 1\n").unwrap();
    hup(&child);
    let refused = wait_line(&rx, "reload refused");
    assert!(refused.contains("nosuch"), "{refused}");
    assert!(health(&mut new).await.starts_with("HTTP/1.1 200"));

    let _ = child.kill();
    let _ = child.wait();
}
