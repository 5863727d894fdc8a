//! Which replicas this one will talk to, and which of them are down right now.
//!
//! Peer URLs come from Redis, and anything that can write to Redis could plant its own URL
//! under an agent's key to receive callers' requests and signed tokens. So a URL is used only
//! if it matches the configured allowlist (`internal_peers`): a CIDR, a host name or address,
//! or a URL pattern with `*`. A URL that matches nothing is ignored, logged once a minute per
//! URL and counted.
//!
//! A peer that failed to connect or answer in time is marked down for
//! `internal_peer_down_for` and skipped, so a dead replica costs one connect timeout rather
//! than one per request, and its agents count as connected nowhere until they register again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::IpNet;

#[derive(Debug, Clone)]
enum Rule {
    Net(IpNet),
    Host(String),
    Pattern(String),
}

#[derive(Debug, thiserror::Error)]
#[error("internal_peers entry {0:?} is neither a CIDR (10.0.0.0/8), a host (gw-2.internal) nor an http(s) URL pattern (https://*.agentgate.svc:8155)")]
pub struct PeerRuleError(String);

/// The allowlist, parsed once at start.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    rules: Vec<Rule>,
}

impl PeerPolicy {
    pub fn parse(entries: &[String]) -> Result<Self, PeerRuleError> {
        let mut rules = vec![];
        for e in entries {
            let e = e.trim();
            let rule = if e.contains("://") {
                // A pattern must be a URL once each `*` stands for a host-name part.
                // A pattern must be a replica's URL once each `*` stands for a host-name part:
                // http(s), a host, a port other than 0, and nothing else.
                match url::Url::parse(&e.replace('*', "x")) {
                    Ok(u)
                        if matches!(u.scheme(), "http" | "https")
                            && u.host().is_some()
                            && u.port() != Some(0)
                            && u.username().is_empty()
                            && u.password().is_none()
                            && u.path() == "/"
                            && u.query().is_none()
                            && u.fragment().is_none() =>
                    {
                        Rule::Pattern(e.to_ascii_lowercase())
                    }
                    _ => return Err(PeerRuleError(e.to_string())),
                }
            } else if let Ok(net) = e.parse::<IpNet>() {
                Rule::Net(net)
            } else if let Ok(ip) = e.parse::<IpAddr>() {
                Rule::Net(IpNet::from(ip))
            } else if !e.is_empty()
                && e.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            {
                Rule::Host(e.to_ascii_lowercase())
            } else {
                return Err(PeerRuleError(e.to_string()));
            };
            rules.push(rule);
        }
        Ok(Self { rules })
    }

    /// True when no allowlist is configured: every URL is used.
    pub fn allows_all(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether this replica may send requests and tokens to `url`.
    pub fn allows(&self, url: &str) -> bool {
        let Ok(parsed) = url::Url::parse(url) else {
            return false;
        };
        if !matches!(parsed.scheme(), "http" | "https") {
            return false;
        }
        if self.rules.is_empty() {
            return true;
        }
        let host = parsed.host_str().unwrap_or("").trim_matches(['[', ']']);
        let ip = host.parse::<IpAddr>().ok();
        let lower = url.to_ascii_lowercase();
        self.rules.iter().any(|r| match r {
            Rule::Net(net) => ip.is_some_and(|ip| net.contains(&ip)),
            Rule::Host(h) => host.eq_ignore_ascii_case(h),
            Rule::Pattern(p) => glob_match(p, lower.trim_end_matches('/')),
        })
    }
}

/// `*` matches a run of host-name characters (letters, digits, `.`, `-`), never `/`, `:`,
/// `?` or `@`, so a pattern for hosts cannot be satisfied by a path or a user part;
/// everything else matches itself.
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.trim_end_matches('/').as_bytes(), text.as_bytes());
    fn go(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => {
                let mut i = 0;
                loop {
                    if go(rest, &t[i..]) {
                        return true;
                    }
                    if i < t.len() && (t[i].is_ascii_alphanumeric() || t[i] == b'.' || t[i] == b'-')
                    {
                        i += 1;
                    } else {
                        return false;
                    }
                }
            }
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    go(p, t)
}

/// Peers marked down after a failure, and when each refused URL was last logged.
#[derive(Default)]
pub struct PeerHealth {
    down_until: Mutex<HashMap<String, Instant>>,
    refused_logged: Mutex<HashMap<String, Instant>>,
}

/// Refused URLs remembered for log throttling at most (they come from Redis).
const REFUSED_LOG_CAP: usize = 1024;

impl PeerHealth {
    pub fn mark_down(&self, peer: &str, for_: Duration) {
        self.down_until
            .lock()
            .unwrap()
            .insert(peer.to_string(), Instant::now() + for_);
    }

    pub fn mark_up(&self, peer: &str) {
        self.down_until.lock().unwrap().remove(peer);
    }

    /// `peers` without those marked down. An agent listed only at replicas that are down is
    /// treated as connected nowhere: a crashed replica's entries stay in Redis until their
    /// TTL, and calling it again for each request would cost every one of them a failed
    /// connect, and fail it, for minutes.
    pub fn usable(&self, peers: Vec<String>) -> Vec<String> {
        let now = Instant::now();
        let mut down = self.down_until.lock().unwrap();
        down.retain(|_, until| *until > now);
        peers
            .into_iter()
            .filter(|p| !down.contains_key(p))
            .collect()
    }

    /// True at most once a minute per URL: whether to log a refused peer again.
    pub fn should_log_refused(&self, url: &str) -> bool {
        let mut logged = self.refused_logged.lock().unwrap();
        let now = Instant::now();
        if logged.len() >= REFUSED_LOG_CAP {
            logged.retain(|_, at| now.duration_since(*at) < Duration::from_secs(60));
        }
        match logged.get(url) {
            Some(at) if now.duration_since(*at) < Duration::from_secs(60) => false,
            _ => {
                if logged.len() < REFUSED_LOG_CAP {
                    logged.insert(url.to_string(), now);
                }
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(e: &[&str]) -> PeerPolicy {
        PeerPolicy::parse(&e.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn urls_match_cidrs_hosts_and_patterns_and_nothing_else() {
        let p = policy(&[
            "10.1.0.0/16",
            "gw-3.internal",
            "https://*.agentgate.svc:8155",
            "::1",
        ]);
        assert!(p.allows("http://10.1.2.3:8155"));
        assert!(!p.allows("http://10.2.2.3:8155"));
        assert!(p.allows("https://GW-3.internal:9000/"));
        assert!(!p.allows("https://gw-3.internal.evil.example:9000"));
        assert!(p.allows("https://gateway-1.agentgate.svc:8155"));
        assert!(!p.allows("https://gateway-1.agentgate.svc:9999"));
        assert!(!p.allows("https://evil.example/?.agentgate.svc:8155"));
        assert!(p.allows("http://[::1]:8155"));
        assert!(!p.allows("grpc://10.1.2.3:8155"), "only http and https");
        assert!(!p.allows("not a url"));
        assert!(policy(&[]).allows("http://anything:1"));
        for bad in [
            "bad host!",
            "http://[bad",
            "https://*.svc:99999",
            "ftp://x",
            "http://*.svc:8155/path",
            "https://*.svc:0",
            "http://user@x:80",
            "10.0.0.0/33",
        ] {
            assert!(PeerPolicy::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_peer_marked_down_is_skipped() {
        let h = PeerHealth::default();
        let both = vec!["http://a".to_string(), "http://b".to_string()];
        h.mark_down("http://a", Duration::from_secs(60));
        assert_eq!(h.usable(both.clone()), vec!["http://b".to_string()]);
        assert_eq!(
            h.usable(vec!["http://a".to_string()]),
            Vec::<String>::new(),
            "an agent listed only there is connected nowhere"
        );
        h.mark_up("http://a");
        assert_eq!(h.usable(both.clone()), both);
        assert!(h.should_log_refused("http://x"));
        assert!(!h.should_log_refused("http://x"));
    }
}
