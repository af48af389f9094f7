//! The plugin's commands. `run` returns what goes to stdout; the binary prints it.

use std::io::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use super::conf::{CniEnv, NetConf};
use super::error::{CniError, Code};
use podsteer_proto::api::{self, ApiError, ClientError, ErrorKind, PodInfo, Request};

/// DEL and STATUS must be quick even when the agent is gone: the runtime waits on us.
const SHORT_DEADLINE: Duration = Duration::from_secs(2);

pub fn run(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    match env.command.as_str() {
        "VERSION" => Ok(Some(version())),
        "ADD" => add(env, &NetConf::parse(stdin)?),
        "DEL" => del(env, &NetConf::parse(stdin)?),
        "CHECK" => check(env, &NetConf::parse(stdin)?),
        "STATUS" => status(&NetConf::parse(stdin)?),
        "GC" => gc(&NetConf::parse(stdin)?),
        "" => Err(CniError::new(Code::InvalidEnv, "CNI_COMMAND is not set", "")),
        other => Err(CniError::new(Code::InvalidEnv, format!("unknown CNI_COMMAND {other:?}"), "ADD, DEL, CHECK, STATUS, GC or VERSION")),
    }
}

fn version() -> Value {
    json!({"cniVersion": super::SPEC_VERSION, "supportedVersions": super::SUPPORTED_VERSIONS})
}

/// Appends one line to the configured log file; logging never fails a pod.
fn log(conf: &NetConf, line: &str) {
    let Some(path) = &conf.log_file else { return };
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(f, "{line}");
    }
}

fn skip_reason(conf: &NetConf, namespace: &str, ann: &std::collections::BTreeMap<String, String>) -> Option<String> {
    podsteer_proto::inject::skip_reason(&conf.exclude_namespaces, conf.injection, namespace, ann)
}

fn add(env: &CniEnv, conf: &NetConf) -> Result<Option<Value>, CniError> {
    let v = &conf.cni_version;
    env.require(true).map_err(|e| e.in_version(v))?;
    let prev = conf.prev_result.clone().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "podsteer-cni is a chained plugin: ADD needs prevResult",
            "put it after the main plugin in the conflist",
        )
        .in_version(v)
    })?;
    if !std::path::Path::new(&env.netns).exists() {
        return Err(CniError::new(Code::InvalidEnv, format!("CNI_NETNS {} does not exist", env.netns), "").in_version(v));
    }
    let ann = conf.annotations()?;
    let ips = conf.ips()?;
    let Some((namespace, name, uid)) = env.pod() else {
        log(conf, &format!("{}: no Kubernetes pod identity in CNI_ARGS; passing through", env.container_id));
        return Ok(Some(prev));
    };
    if let Some(why) = skip_reason(conf, &namespace, &ann) {
        log(conf, &format!("{namespace}/{name}: not meshed: {why}"));
        return Ok(Some(prev));
    }
    let pod = PodInfo {
        uid,
        name: name.clone(),
        namespace: namespace.clone(),
        netns: env.netns.clone().into(),
        ips,
        annotations: ann,
        container_id: Some(env.container_id.clone()),
    };
    match api::call(&conf.agent_socket, &Request::Add { pod }, Duration::from_millis(conf.timeout_ms), None) {
        Ok(resp) => match resp.into_result() {
            Ok(_) => {
                log(conf, &format!("{namespace}/{name}: intercepted"));
                Ok(Some(prev))
            }
            Err(e) => Err(agent_error(&e).in_version(v)),
        },
        Err(e) if conf.fail_open => {
            log(conf, &format!("FAIL-OPEN: {namespace}/{name} starts WITHOUT interception: {e}"));
            eprintln!("podsteer-cni: FAIL-OPEN: {namespace}/{name} starts without interception: {e}");
            Ok(Some(prev))
        }
        Err(e) => Err(unreachable(&conf.agent_socket, &e).in_version(v)),
    }
}

fn agent_error(e: &ApiError) -> CniError {
    let code = match e.kind {
        ErrorKind::InvalidPolicy => Code::PolicyRefused,
        ErrorKind::BadNetns => Code::InvalidEnv,
        ErrorKind::NotReady => Code::TryAgainLater,
        ErrorKind::BadRequest => Code::InvalidConfig,
        ErrorKind::NotFound => Code::NotIntercepted,
        ErrorKind::Internal | ErrorKind::Forbidden => Code::AgentFailed,
    };
    CniError::new(code, "podsteer agent refused the pod", e.message.clone())
}

fn unreachable(socket: &std::path::Path, e: &ClientError) -> CniError {
    let mut details = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        details.push_str(": ");
        details.push_str(&s.to_string());
        src = s.source();
    }
    CniError::new(
        Code::TryAgainLater,
        format!("podsteer agent unreachable at {}; the pod will not start un-intercepted", socket.display()),
        details,
    )
}

/// Idempotent: unknown pods, a missing netns and an absent agent are all success.
fn del(env: &CniEnv, conf: &NetConf) -> Result<Option<Value>, CniError> {
    env.require(false).map_err(|e| e.in_version(&conf.cni_version))?;
    let Some((namespace, name, uid)) = env.pod() else { return Ok(None) };
    match api::call(&conf.agent_socket, &Request::Del { uid }, SHORT_DEADLINE, None).map(api::Response::into_result) {
        Ok(Ok(_)) => log(conf, &format!("{namespace}/{name}: removed")),
        Ok(Err(e)) => log(conf, &format!("{namespace}/{name}: agent could not remove it now ({}); it reconciles later", e.message)),
        Err(e) => log(conf, &format!("{namespace}/{name}: agent unreachable on DEL ({e}); it reconciles later")),
    }
    Ok(None)
}

fn check(env: &CniEnv, conf: &NetConf) -> Result<Option<Value>, CniError> {
    let v = &conf.cni_version;
    env.require(true).map_err(|e| e.in_version(v))?;
    if conf.prev_result.is_none() {
        return Err(CniError::new(Code::InvalidConfig, "CHECK needs prevResult", "").in_version(v));
    }
    let Some((namespace, _name, uid)) = env.pod() else { return Ok(None) };
    if skip_reason(conf, &namespace, &conf.annotations()?).is_some() {
        return Ok(None);
    }
    match api::call(&conf.agent_socket, &Request::Check { uid }, SHORT_DEADLINE, None) {
        Ok(resp) => resp
            .into_result()
            .map(|_| None)
            .map_err(|e| CniError::new(Code::NotIntercepted, "interception is not in place", e.message).in_version(v)),
        Err(e) => Err(unreachable(&conf.agent_socket, &e).in_version(v)),
    }
}

fn status(conf: &NetConf) -> Result<Option<Value>, CniError> {
    match api::call(&conf.agent_socket, &Request::Status, SHORT_DEADLINE, None) {
        Ok(resp) if resp.ok => Ok(None),
        Ok(resp) => {
            Err(CniError::new(Code::NotAvailable, "podsteer agent is not ready", resp.error.map(|e| e.message).unwrap_or_default())
                .in_version(&conf.cni_version))
        }
        Err(e) => Err(CniError::new(Code::NotAvailable, "podsteer agent is not reachable", e.to_string()).in_version(&conf.cni_version)),
    }
}

fn gc(conf: &NetConf) -> Result<Option<Value>, CniError> {
    let Some(valid) = &conf.valid_attachments else { return Ok(None) };
    let keep: Vec<String> = valid.iter().filter_map(|a| a.get("containerID")?.as_str().map(str::to_owned)).collect();
    match api::call(&conf.agent_socket, &Request::Gc { keep }, SHORT_DEADLINE, None).map(api::Response::into_result) {
        Ok(Ok(_)) => Ok(None),
        Ok(Err(e)) => Err(CniError::new(Code::AgentFailed, "podsteer agent GC failed", e.message).in_version(&conf.cni_version)),
        // Nothing to collect while the agent is away; it reconciles at start.
        Err(_) => Ok(None),
    }
}
