//! Settings in layers, through figment. Lowest first, each later layer winning key by key:
//! the built-in defaults, the TOML file (`--config`), `AGENTGATE_<NAME>` environment
//! variables, `--set NAME=VALUE`, then the command's own flags. Every field of the gateway's
//! configuration can be set in each layer but the last. An unknown key in the file or in
//! `--set` is an error naming where it came from; an unknown `AGENTGATE_*` variable is a
//! warning, since the environment also carries the agent's and the tooling's variables.

use std::path::Path;

use documented::DocumentedFields;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Where each layer comes from, for the sentence an error becomes.
const SET_LAYER: &str = "--set";
const FLAGS_LAYER: &str = "the command line";

/// Where a settings type's environment variables are read.
pub enum EnvLayer {
    /// Here, `PREFIX<NAME>` for every setting (the gateway: `AGENTGATE_`).
    Prefixed(&'static str),
    /// By clap, each flag from its own variable, into the flags' layer (the agent); other
    /// variables with this prefix are unknown.
    WithTheFlags(&'static str),
}

/// The settings `T` from its defaults and the layers above them.
///
/// `flags` serializes only the flags given (`None`s and empty lists skipped); `flag_env`
/// names the variables that flags fall back to (read by clap, so known too).
pub fn layered<T>(
    file: Option<&Path>,
    env: EnvLayer,
    set: &[String],
    flags: &impl Serialize,
    flag_env: &[String],
) -> anyhow::Result<T>
where
    T: Serialize + DeserializeOwned + Default + DocumentedFields,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        // figment skips a missing file without a word; a named file that is not there is a
        // mistake worth stopping for.
        std::fs::metadata(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        figment = figment.merge(Toml::file_exact(path));
    }
    // The agent's settings are the ones with the flags in their layer.
    let defaults = match env {
        EnvLayer::Prefixed(_) => "agentgate config defaults",
        EnvLayer::WithTheFlags(_) => "agentgate config defaults --for agent",
    };
    let env_prefix = match env {
        EnvLayer::Prefixed(prefix) => {
            figment = figment.merge(Env::prefixed(prefix).only(T::FIELD_NAMES));
            warn_unknown_env(
                prefix,
                T::FIELD_NAMES,
                flag_env,
                "takes a setting's name from `agentgate config defaults` in upper case",
            );
            prefix
        }
        EnvLayer::WithTheFlags(prefix) => {
            warn_unknown_env(
                prefix,
                &[],
                flag_env,
                "is one of the variables `agentgate agent --help` lists as [env: ...]",
            );
            prefix
        }
    };
    figment = figment
        .merge(Named::new(SET_LAYER, set_pairs(set)?))
        .merge(Named::new(
            FLAGS_LAYER,
            Serialized::defaults(flags).data().map_err(|e| {
                anyhow::anyhow!("the command line flags do not map onto settings: {e}")
            })?,
        ));
    figment
        .extract()
        .map_err(|e| anyhow::anyhow!(describe(e, env_prefix, defaults)))
}

/// `--set NAME=VALUE` pairs as one layer: VALUE in TOML syntax (numbers, booleans, arrays,
/// quoted strings), or else taken as a plain string (`--set shutdown_grace=5s`).
fn set_pairs(set: &[String]) -> anyhow::Result<Map<Profile, Dict>> {
    let mut dict = Dict::new();
    for pair in set {
        let (name, value) = pair
            .split_once('=')
            .filter(|(n, _)| !n.trim().is_empty())
            .ok_or_else(|| anyhow::anyhow!("--set {pair:?}: expected NAME=VALUE"))?;
        let value: figment::value::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .map_or_else(
                || figment::value::Value::from(value.to_string()),
                |v| figment::value::Value::serialize(v).expect("a TOML value serializes"),
            );
        dict.insert(name.trim().to_string(), value);
    }
    Ok(Profile::Default.collect(dict))
}

/// A layer under a name of our choosing, so that an error can say where a value came from.
struct Named {
    name: &'static str,
    data: Map<Profile, Dict>,
}

impl Named {
    fn new(name: &'static str, data: Map<Profile, Dict>) -> Self {
        Self { name, data }
    }
}

impl Provider for Named {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name)
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(self.data.clone())
    }
}

/// One sentence for a settings error: which setting, from which layer, what is wrong with
/// it, and where to look (`defaults`: the command that lists the settings).
fn describe(errors: figment::Error, env_prefix: &str, defaults: &str) -> String {
    let sentences: Vec<String> = errors
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let source = match &e.metadata {
                Some(md) => match &md.source {
                    Some(Source::File(path)) => format!("in {}", path.display()),
                    _ if md.name.contains("environment") => format!(
                        "from the environment variable {env_prefix}{}",
                        key.to_ascii_uppercase()
                    ),
                    _ => format!("from {}", md.name),
                },
                None => "in the settings".to_string(),
            };
            match &e.kind {
                // The path names a nested key whole (`backends.0.service`); a top-level one
                // has none.
                figment::error::Kind::UnknownField(name, _) => format!(
                    "unknown setting {:?} {source}: `{defaults}` lists every setting with \
                     its meaning",
                    if key.is_empty() { name } else { &key }
                ),
                // The file itself does not parse: TOML's own message points at the place.
                kind if key.is_empty() => format!("cannot use the settings {source}: {kind}"),
                kind => format!(
                    "invalid value for the setting {key:?} {source}: {}; `{defaults}` shows \
                     each setting's form and default",
                    in_plain_words(&kind.to_string())
                ),
            }
        })
        .collect();
    sentences.join("\n")
}

/// serde's words for a value of the wrong type, with Rust's type names ("expected usize",
/// "found unsigned int `3`") said as a person would.
fn in_plain_words(kind: &str) -> String {
    let mut out = kind.to_string();
    for (rust, plain) in [
        ("usize", "a whole number"),
        ("u64", "a whole number"),
        ("u32", "a whole number"),
        ("u16", "a whole number (a port)"),
        ("u8", "a small whole number"),
        ("f64", "a number"),
        ("unsigned int", "the number"),
        ("signed int", "the number"),
        ("found string", "found the text"),
        ("found bool", "found"),
    ] {
        out = out.replace(rust, plain);
    }
    out.replace("invalid value the number", "invalid value: the number")
        .replace(
            "expected a duration",
            "expected a duration such as 30s or 5m (quoted in a TOML file)",
        )
}

/// `AGENTGATE_*` variables read by other code than a flag: the agent's token, the build's
/// commit, and the test and benchmark tooling's own.
const OTHER_ENV: &[&str] = &[
    "AGENTGATE_TOKEN",
    "AGENTGATE_BUILD_COMMIT",
    "AGENTGATE_BIN",
    "AGENTGATE_E2E_KEEP_LOGS",
    "AGENTGATE_GENERATED_CASES",
];

/// A misspelt `AGENTGATE_*` variable would otherwise be ignored without a word.
fn warn_unknown_env(prefix: &str, settings: &[&str], flag_env: &[String], names: &str) {
    for (var, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
        let Some(setting) = var.strip_prefix(prefix) else {
            continue;
        };
        let setting = setting.to_ascii_lowercase();
        let known = settings.contains(&setting.as_str())
            || OTHER_ENV.contains(&var.as_str())
            || flag_env.contains(&var);
        if !known {
            tracing::warn!(
                variable = %var,
                "unknown setting in the environment, ignored: {prefix}<SETTING> {names}"
            );
        }
    }
}

/// Every environment variable a flag of `cmd` or of its subcommands falls back to.
pub fn flag_env_names(cmd: &clap::Command) -> Vec<String> {
    let mut names: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    for sub in cmd.get_subcommands() {
        names.extend(flag_env_names(sub));
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_errors_name_no_rust_types() {
        assert_eq!(
            in_plain_words("invalid type: found unsigned int `3`, expected a duration"),
            "invalid type: found the number `3`, expected a duration such as 30s or 5m (quoted \
             in a TOML file)"
        );
        assert_eq!(
            in_plain_words("invalid value signed int `-1`, expected usize"),
            "invalid value: the number `-1`, expected a whole number"
        );
    }
    use agentgate_gateway::GatewayConfig;
    use std::time::Duration;

    #[derive(Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        max_connections: Option<usize>,
    }

    const GATEWAY: EnvLayer = EnvLayer::Prefixed("AGENTGATE_");
    const NONE: Flags = Flags {
        max_connections: None,
    };

    // One test touches the environment, so that tests running in parallel do not see each
    // other's variables.
    #[test]
    fn defaults_then_file_then_env_then_set_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("g.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:9000\"\nhandshake_timeout = \"2s\"\nmax_connections = 5\n\
             tls_cert = \"/c.pem\"\nshutdown_grace = \"9s\"\n",
        )
        .unwrap();
        let c: GatewayConfig = layered(Some(&f), GATEWAY, &[], &NONE, &[]).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.handshake_timeout, Duration::from_secs(2));
        assert_eq!(c.max_connections, 5);
        assert_eq!(c.tls_cert.as_deref(), Some(Path::new("/c.pem")));
        assert_eq!(c.auth_timeout, GatewayConfig::default().auth_timeout);

        // SAFETY: the only test in this binary that touches the environment.
        unsafe {
            std::env::set_var("AGENTGATE_MAX_CONNECTIONS", "7");
            std::env::set_var("AGENTGATE_SHUTDOWN_GRACE", "4s");
            std::env::set_var("AGENTGATE_INTERNAL_PEERS", "10.0.0.0/8, gw-2.internal");
        }
        let c: GatewayConfig = layered(Some(&f), GATEWAY, &[], &NONE, &[]).unwrap();
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.shutdown_grace, Duration::from_secs(4));
        assert_eq!(c.internal_peers, ["10.0.0.0/8", "gw-2.internal"]);

        let set = [
            "shutdown_grace=1s".to_string(),
            "max_connections = 8".to_string(),
        ];
        let c: GatewayConfig = layered(Some(&f), GATEWAY, &set, &NONE, &[]).unwrap();
        assert_eq!(
            (c.shutdown_grace, c.max_connections),
            (Duration::from_secs(1), 8)
        );
        let flags = Flags {
            max_connections: Some(9),
        };
        let c: GatewayConfig = layered(Some(&f), GATEWAY, &set, &flags, &[]).unwrap();
        assert_eq!(c.max_connections, 9);

        // A bad value names its setting and the variable it came from.
        unsafe { std::env::set_var("AGENTGATE_MAX_CONNECTIONS", "many") };
        let err = layered::<GatewayConfig>(None, GATEWAY, &[], &NONE, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"max_connections\""), "{err}");
        assert!(err.contains("AGENTGATE_MAX_CONNECTIONS"), "{err}");
        unsafe {
            std::env::remove_var("AGENTGATE_MAX_CONNECTIONS");
            std::env::remove_var("AGENTGATE_SHUTDOWN_GRACE");
            std::env::remove_var("AGENTGATE_INTERNAL_PEERS");
        }

        // Unknown keys: in the file and in --set, each named with its layer.
        std::fs::write(&f, "no_such_setting = 1\n").unwrap();
        let err = layered::<GatewayConfig>(Some(&f), GATEWAY, &[], &NONE, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no_such_setting") && err.contains("g.toml"),
            "{err}"
        );
        let set = ["shutdown_gracee=1s".to_string()];
        let err = layered::<GatewayConfig>(None, GATEWAY, &set, &NONE, &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shutdown_gracee") && err.contains("--set"),
            "{err}"
        );
        let err = layered::<GatewayConfig>(
            Some(&dir.path().join("missing.toml")),
            GATEWAY,
            &[],
            &NONE,
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot read config file"), "{err}");
    }
}
