//! A stand-in for the Kubernetes API server, for the agent's `--kubernetes`
//! source: there is no control plane on this machine. It serves what the
//! agent's watches ask for, the way the API server does: a list with a
//! `resourceVersion`, then a watch from it (chunked JSON events, ended after
//! a few seconds, as the real one ends them, so the client must re-watch),
//! bearer-token authentication, and 404 for Istio's CRDs until they are
//! "installed". One listener on the loopback of each lab node's netns, one
//! store behind them all, as one API server serves a cluster.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::Node;

const TOKEN: &str = "podsteer-lab-token";
/// How long one watch lasts before the server ends it.
const WATCH_LIFETIME: Duration = Duration::from_secs(4);

/// The collections served: (path, list kind, object kind).
const COLLECTIONS: [(&str, &str, &str); 3] = [
    ("/api/v1/pods", "PodList", "Pod"),
    ("/apis/security.istio.io/v1/authorizationpolicies", "AuthorizationPolicyList", "AuthorizationPolicy"),
    ("/apis/security.istio.io/v1/peerauthentications", "PeerAuthenticationList", "PeerAuthentication"),
];

#[derive(Default)]
struct Store {
    rv: u64,
    /// (collection, key) → object.
    objects: BTreeMap<(usize, String), Value>,
    /// (rv, collection, type, object), every change ever.
    events: Vec<(u64, usize, &'static str, Value)>,
    crds: bool,
    /// A watch from before this resourceVersion is answered 410 Gone (its
    /// history was compacted away), and must list again.
    compacted: u64,
}

struct Shared {
    store: Mutex<Store>,
    changed: Condvar,
    stop: AtomicBool,
    watches: AtomicU64,
    watches_ended: AtomicU64,
    unauthorized: AtomicU64,
}

pub struct ApiServer {
    shared: Arc<Shared>,
    addrs: Vec<SocketAddr>,
    kubeconfigs: Vec<PathBuf>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn collection_of(kind: &str) -> anyhow::Result<usize> {
    COLLECTIONS.iter().position(|c| c.2 == kind).ok_or_else(|| anyhow::anyhow!("the lab's API server does not serve {kind}"))
}

fn key_of(obj: &Value) -> String {
    let m = &obj["metadata"];
    format!("{}/{}", m["namespace"].as_str().unwrap_or(""), m["name"].as_str().unwrap_or(""))
}

impl ApiServer {
    /// Listens in each node's netns; `crds`: whether Istio's CRDs are installed.
    pub fn start(nodes: &[&Node], crds: bool) -> anyhow::Result<ApiServer> {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store { crds, rv: 1, ..Store::default() }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            watches: AtomicU64::new(0),
            watches_ended: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
        });
        let mut server = ApiServer { shared, addrs: Vec::new(), kubeconfigs: Vec::new(), threads: Vec::new() };
        for node in nodes {
            let netns = std::fs::File::open(node.netns().path())?;
            let listener = crate::netns::run_in(std::os::fd::AsFd::as_fd(&netns), "lab API server", || TcpListener::bind("127.0.0.1:0"))??;
            listener.set_nonblocking(true)?;
            let addr = listener.local_addr()?;
            let kubeconfig = node.state_dir().join("kubeconfig");
            std::fs::write(
                &kubeconfig,
                format!(
                    "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://{addr}\nusers:\n- name: lab\n  user:\n    token: {TOKEN}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\ncurrent-context: lab\n"
                ),
            )?;
            let shared = server.shared.clone();
            server.threads.push(std::thread::spawn(move || accept(listener, shared)));
            server.addrs.push(addr);
            server.kubeconfigs.push(kubeconfig);
        }
        Ok(server)
    }

    /// Node `i`'s kubeconfig (its server is on that node's loopback).
    pub fn kubeconfig(&self, i: usize) -> &std::path::Path {
        &self.kubeconfigs[i]
    }

    /// Creates or replaces an object (a Pod, an AuthorizationPolicy, a
    /// PeerAuthentication), as `kubectl apply` would; its watchers see it.
    pub fn apply(&self, mut obj: Value) -> anyhow::Result<()> {
        let c = collection_of(obj["kind"].as_str().unwrap_or_default())?;
        let mut s = self.shared.store.lock().unwrap_or_else(|e| e.into_inner());
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&obj);
        let kind = if s.objects.insert((c, key), obj.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        s.events.push((rv, c, kind, obj));
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Deletes `kind` `namespace/name`; false if there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> anyhow::Result<bool> {
        let c = collection_of(kind)?;
        let mut s = self.shared.store.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut obj) = s.objects.remove(&(c, format!("{namespace}/{name}"))) else { return Ok(false) };
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.events.push((rv, c, "DELETED", obj));
        self.shared.changed.notify_all();
        Ok(true)
    }

    /// Installs (or removes) Istio's CRDs: until then their paths answer 404.
    pub fn set_crds(&self, installed: bool) {
        self.shared.store.lock().unwrap_or_else(|e| e.into_inner()).crds = installed;
    }

    /// Deletes `kind` `namespace/name` and compacts the history past it, as
    /// etcd does: every open watch ends, no watch sees the deletion, and a
    /// watch resumed from before it is answered 410 Gone. Only a client that
    /// lists again learns the object is gone.
    pub fn delete_unseen(&self, kind: &str, namespace: &str, name: &str) -> anyhow::Result<bool> {
        let c = collection_of(kind)?;
        let mut s = self.shared.store.lock().unwrap_or_else(|e| e.into_inner());
        let gone = s.objects.remove(&(c, format!("{namespace}/{name}"))).is_some();
        s.rv += 1;
        s.compacted = s.rv;
        self.shared.changed.notify_all();
        Ok(gone)
    }

    /// How many watches clients have opened so far.
    pub fn watches(&self) -> u64 {
        self.shared.watches.load(Ordering::Relaxed)
    }

    /// How many watches have ended (all last as long, so they end in the order they opened).
    pub fn watches_ended(&self) -> u64 {
        self.shared.watches_ended.load(Ordering::Relaxed)
    }

    /// Requests refused for a missing or wrong bearer token.
    pub fn unauthorized(&self) -> u64 {
        self.shared.unauthorized.load(Ordering::Relaxed)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &shared);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return,
        }
    }
}

struct Request {
    path: String,
    query: BTreeMap<String, String>,
    authorized: bool,
}

fn read_request(r: &mut BufReader<TcpStream>, shared: &Shared) -> anyhow::Result<Option<Request>> {
    let mut line = String::new();
    loop {
        match r.read_line(&mut line) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if shared.stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut authorized = false;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':')
            && name.eq_ignore_ascii_case("authorization")
        {
            authorized = value.trim() == format!("Bearer {TOKEN}");
        }
    }
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
    Ok(Some(Request { path: path.to_owned(), query, authorized }))
}

fn respond(w: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    write!(w, "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": code, "reason": reason, "message": message })
}

fn serve(conn: TcpStream, shared: &Shared) -> anyhow::Result<()> {
    conn.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    while let Some(req) = read_request(&mut r, shared)? {
        if !req.authorized {
            shared.unauthorized.fetch_add(1, Ordering::Relaxed);
            respond(&mut w, 401, &status(401, "Unauthorized", "Unauthorized"))?;
            continue;
        }
        let Some(c) = COLLECTIONS.iter().position(|c| c.0 == req.path) else {
            respond(&mut w, 404, &status(404, "NotFound", "the server could not find the requested resource"))?;
            continue;
        };
        if c > 0 && !shared.store.lock().unwrap_or_else(|e| e.into_inner()).crds {
            respond(&mut w, 404, &status(404, "NotFound", "the server could not find the requested resource"))?;
            continue;
        }
        if req.query.get("watch").is_some_and(|v| v == "true" || v == "1") {
            let since = req.query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            shared.watches.fetch_add(1, Ordering::Relaxed);
            let streamed = watch(&mut w, shared, c, since);
            shared.watches_ended.fetch_add(1, Ordering::Relaxed);
            return streamed;
        }
        let (items, rv) = {
            let s = shared.store.lock().unwrap_or_else(|e| e.into_inner());
            (s.objects.iter().filter(|((cc, _), _)| *cc == c).map(|(_, o)| o.clone()).collect::<Vec<_>>(), s.rv)
        };
        let api_version = if c == 0 { "v1" } else { "security.istio.io/v1" };
        respond(
            &mut w,
            200,
            &json!({ "apiVersion": api_version, "kind": COLLECTIONS[c].1, "metadata": { "resourceVersion": rv.to_string() }, "items": items }),
        )?;
    }
    Ok(())
}

/// Streams the collection's events after `since`, until the watch's lifetime is over.
fn watch(w: &mut TcpStream, shared: &Shared, c: usize, mut since: u64) -> anyhow::Result<()> {
    write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")?;
    w.flush()?;
    let end = Instant::now() + WATCH_LIFETIME;
    let mut s = shared.store.lock().unwrap_or_else(|e| e.into_inner());
    if since < s.compacted {
        drop(s);
        let gone = format!("{}\n", json!({ "type": "ERROR", "object": status(410, "Expired", "too old resource version") }));
        write!(w, "{:x}\r\n{gone}\r\n0\r\n\r\n", gone.len())?;
        return Ok(());
    }
    let compacted = s.compacted;
    while Instant::now() < end && !shared.stop.load(Ordering::Relaxed) && s.compacted == compacted {
        let fresh: Vec<String> = s
            .events
            .iter()
            .filter(|(rv, cc, _, _)| *rv > since && *cc == c)
            .map(|(_, _, t, o)| format!("{}\n", json!({ "type": t, "object": o })))
            .collect();
        since = s.rv;
        if !fresh.is_empty() {
            drop(s);
            for e in fresh {
                write!(w, "{:x}\r\n{e}\r\n", e.len())?;
            }
            w.flush()?;
            s = shared.store.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        s = shared.changed.wait_timeout(s, Duration::from_millis(200)).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0);
    }
    drop(s);
    write!(w, "0\r\n\r\n")?;
    Ok(())
}

/// A Pod object as the API server holds it once the pod runs on `node_name`.
pub fn pod_object(pod: &crate::Pod, service_account: &str, node_name: &str, labels: &[(&str, &str)]) -> Value {
    let labels: serde_json::Map<String, Value> = labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name(), "namespace": pod.namespace(), "uid": pod.uid(), "labels": labels,
            "annotations": { "kubectl.kubernetes.io/last-applied-configuration": "{\"a\":\"large\"}" },
        },
        "spec": { "serviceAccountName": service_account, "nodeName": node_name, "containers": [{ "name": "app", "image": "app:latest" }] },
        "status": { "phase": "Running", "podIP": pod.ips().first().map(|ip| ip.to_string()), "podIPs": pod.ips().iter().map(|ip| json!({ "ip": ip.to_string() })).collect::<Vec<_>>() },
    })
}
