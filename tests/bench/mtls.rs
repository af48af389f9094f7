//! What mTLS costs apart from the data path: full TLS 1.3 handshakes per
//! second on one core with podsteer's own configurations (ECDSA P-256,
//! mutual, the identity checks), and the proxy's policy evaluation per
//! connection with 1,000 policies on the node.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use podsteer_identity::issuer::{Issuer as _, LocalIssuer};
use podsteer_identity::spiffe::SpiffeId;
use podsteer_identity::tls::{CurrentCert, Trust, certified_key};
use serde_json::{Value, json};

use crate::setup::Lab;

/// Handshakes in memory (no sockets): the CPU a handshake costs both sides together.
fn handshakes_per_s(ca_dir: &std::path::Path, run: Duration) -> anyhow::Result<f64> {
    let td = "cluster.local";
    let issuer = LocalIssuer::from_dir(ca_dir, td, Duration::from_secs(3600))?;
    let trust = Trust::new(td, &podsteer_identity::ca::read_certs(&ca_dir.join(podsteer_identity::ca::BUNDLE_FILE))?)?;
    let cert = |id: &SpiffeId| -> anyhow::Result<Arc<CurrentCert>> {
        let leaf = issuer.issue(id, SystemTime::now())?;
        Ok(Arc::new(CurrentCert::new(certified_key(leaf.chain, &leaf.key)?)))
    };
    let (client_id, server_id) = (SpiffeId::new(td, "bench", "client")?, SpiffeId::new(td, "bench", "server")?);
    let client = trust.client_config(cert(&client_id)?, server_id.clone())?;
    let server = trust.server_config(cert(&server_id)?)?;
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::new(10, 244, 1, 2).into());
    let (started, mut n) = (Instant::now(), 0u64);
    while started.elapsed() < run {
        let mut c = rustls::ClientConnection::new(client.clone(), name.clone())?;
        let mut s = rustls::ServerConnection::new(server.clone())?;
        while c.is_handshaking() || s.is_handshaking() {
            let mut buf = Vec::new();
            c.write_tls(&mut buf)?;
            s.read_tls(&mut buf.as_slice())?;
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf)?;
            c.read_tls(&mut buf.as_slice())?;
            c.process_new_packets()?;
        }
        n += 1;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

pub fn run(lab: &Lab, quick: bool) -> anyhow::Result<Value> {
    let mesh = lab.setups[7].mesh.as_ref().ok_or_else(|| anyhow::anyhow!("setup 7 is a cluster"))?;
    let ca = mesh.cluster.nodes[0].state_dir().join("ca");
    let hs = handshakes_per_s(&ca, Duration::from_millis(if quick { 300 } else { 2000 }))?;
    eprintln!("bench: {hs:.0} mTLS handshakes/s (both sides, one core)");
    // The server's proxy on the node with 1,000 policies.
    let p = &lab.setups[8].proxies[1];
    let (ns, n) = (p.metric("podsteer_proxy_authz_eval_nanoseconds_total")?, p.metric("podsteer_proxy_authz_evaluations_total")?);
    let per = if n > 0.0 { ns / n / 1000.0 } else { f64::NAN };
    eprintln!("bench: policy evaluation {per:.2} us per connection over {n} connections, 1,000 policies");
    Ok(json!({"handshakes_per_s": hs, "authz_eval_us_per_conn": per, "authz_evaluations": n}))
}
