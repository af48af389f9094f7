//! SPIFFE IDs in the Kubernetes shape Istio and Linkerd use:
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeError {
    #[error("{0:?} does not start with spiffe://")]
    Scheme(String),
    #[error("trust domain {0:?}: only lowercase letters, digits, '.', '-' and '_', not empty")]
    TrustDomain(String),
    #[error("{0:?} is not /ns/<namespace>/sa/<service-account>")]
    Path(String),
    #[error("{what} {value:?}: only letters, digits, '.', '-' and '_', not empty, not '.' or '..'")]
    Segment { what: &'static str, value: String },
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<SpiffeId, SpiffeError> {
        check_trust_domain(trust_domain)?;
        check_segment("namespace", namespace)?;
        check_segment("service account", service_account)?;
        Ok(SpiffeId { trust_domain: trust_domain.into(), namespace: namespace.into(), service_account: service_account.into() })
    }

    pub fn parse(s: &str) -> Result<SpiffeId, SpiffeError> {
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| SpiffeError::Scheme(s.into()))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| SpiffeError::Path(s.into()))?;
        match path.split('/').collect::<Vec<_>>()[..] {
            ["ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa),
            _ => Err(SpiffeError::Path(s.into())),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The principal as Istio's AuthorizationPolicy writes it (no scheme).
    pub fn principal(&self) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

/// Whether `td` can be a trust domain name.
pub fn check_trust_domain(td: &str) -> Result<(), SpiffeError> {
    let ok = !td.is_empty() && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(SpiffeError::TrustDomain(td.into())) }
}

fn check_segment(what: &'static str, value: &str) -> Result<(), SpiffeError> {
    let ok = !value.is_empty() && value != "." && value != ".." && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(SpiffeError::Segment { what, value: value.into() }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_spiffe_does_not_allow() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/production/sa/order-service").expect("valid");
        assert_eq!((id.trust_domain(), id.namespace(), id.service_account()), ("cluster.local", "production", "order-service"));
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/production/sa/order-service");
        assert_eq!(id.principal(), "cluster.local/ns/production/sa/order-service");
        for bad in [
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a/sa/b%20c",
            "spiffe://cluster.local/sa/b/ns/a",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} was accepted");
        }
    }
}
