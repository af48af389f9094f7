//! Runs the real `podsteer-injector` in a lab node's netns with a test CA,
//! and talks to it as the API server does: HTTPS, verifying its certificate.

use std::net::SocketAddr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::node::Node;
use crate::process::LabProcess;

/// A CA for the webhook's serving certificate, made here with rcgen.
pub struct TestCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub cert: CertificateDer<'static>,
}

impl TestCa {
    pub fn new(name: &str) -> anyhow::Result<TestCa> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?.der().clone();
        Ok(TestCa { issuer: rcgen::Issuer::new(params, key), cert })
    }

    /// A serving certificate for `names`, as (chain PEM, key PEM).
    pub fn leaf(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        let params = rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// The injector process and a client for it.
pub struct Injector {
    process: LabProcess,
    pub addr: SocketAddr,
    netns: std::fs::File,
    /// The certificate files it serves, which a test may replace.
    pub cert: PathBuf,
    pub key: PathBuf,
    pub log: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Injector {
    /// Starts the injector on `port` in the node netns, serving a certificate
    /// for `localhost` from `ca`; ready once `/ready` answers over HTTPS.
    pub fn start(node: &Node, ca: &TestCa, port: u16, extra: &[&str]) -> anyhow::Result<Injector> {
        let dir = node.state_dir().join(format!("injector-{port}"));
        std::fs::create_dir_all(&dir)?;
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let (chain, key_pem) = ca.leaf(&["localhost"])?;
        std::fs::write(&cert, chain)?;
        std::fs::write(&key, key_pem)?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = dir.join("injector.log");
        let mut cmd = node.command(crate::agent::bin("podsteer-injector"))?;
        cmd.args(["--listen", &addr.to_string(), "--log-json"])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let process = node.spawn_owned("podsteer-injector", cmd)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let inj = Injector { process, addr, netns: std::fs::File::open(node.netns().path())?, cert, key, log, rt };
        crate::wait::until("the injector's /ready over HTTPS", Duration::from_secs(10), || {
            inj.request(&ca.cert, "GET", "/ready", Vec::new()).ok().filter(|(s, _)| *s == 200)
        })
        .map_err(|e| e.context(std::fs::read_to_string(&inj.log).unwrap_or_default()))?;
        Ok(inj)
    }

    /// POSTs `body` to `path`, trusting only `ca`; the status and the body.
    pub fn post(&self, ca: &CertificateDer<'static>, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, Vec<u8>)> {
        self.request(ca, "POST", path, body)
    }

    pub fn request(&self, ca: &CertificateDer<'static>, method: &str, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, Vec<u8>)> {
        let tcp = crate::netns::run_in(self.netns.as_fd(), "injector client", || std::net::TcpStream::connect(self.addr))??;
        tcp.set_nonblocking(true)?;
        self.rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), https(tcp, ca, method, path, body)).await })
            .context("HTTPS request timed out")?
    }

    /// One sample from its /metrics (over HTTPS), by full name and labels; 0 when absent.
    pub fn metric(&self, ca: &CertificateDer<'static>, name_and_labels: &str) -> anyhow::Result<f64> {
        let (status, body) = self.request(ca, "GET", "/metrics", Vec::new())?;
        anyhow::ensure!(status == 200, "/metrics: HTTP {status}");
        let text = String::from_utf8(body)?;
        Ok(text.lines().find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0))
    }

    /// Its JSON log lines so far.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }
}

async fn https(
    tcp: std::net::TcpStream,
    ca: &CertificateDer<'static>,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost")?, tokio::net::TcpStream::from_std(tcp)?)
        .await
        .context("TLS handshake with the injector")?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    Ok((status, body))
}

/// A cert/key pair written where an injector reads it (a rotation).
pub fn write_pair(cert: &Path, key: &Path, pair: (String, String)) -> anyhow::Result<()> {
    std::fs::write(cert, pair.0)?;
    std::fs::write(key, pair.1)?;
    Ok(())
}
