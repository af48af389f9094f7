//! podsteer-cni: the chained CNI plugin. Small, quick, never panics: every
//! failure is a CNI error on stdout and a non-zero exit.

use std::io::{Read as _, Write as _};

use podsteer_cni::conf::CniEnv;
use podsteer_cni::error::{CniError, Code};
use podsteer_cni::plugin;

fn main() {
    let outcome = std::panic::catch_unwind(|| {
        let env = CniEnv::from_vars(|k| std::env::var(k).ok());
        let mut stdin = Vec::new();
        // VERSION may come without stdin; other commands fail on decode if it is empty.
        if let Err(e) = std::io::stdin().take(1 << 20).read_to_end(&mut stdin) {
            return Err(CniError::new(Code::Io, "reading the network config from stdin", e.to_string()));
        }
        plugin::run(&env, &stdin)
    })
    .unwrap_or_else(|_| Err(CniError::new(Code::AgentFailed, "podsteer-cni hit an internal error", "a bug: please report it")));
    let mut out = std::io::stdout().lock();
    let code = match outcome {
        Ok(Some(v)) => {
            let _ = serde_json::to_writer(&mut out, &v);
            0
        }
        Ok(None) => 0,
        Err(e) => {
            let _ = serde_json::to_writer(&mut out, &e);
            1
        }
    };
    let _ = out.write_all(b"\n");
    let _ = out.flush();
    std::process::exit(code);
}
