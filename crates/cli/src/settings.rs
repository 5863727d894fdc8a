//! Layered settings: built-in defaults, then a TOML file, then `AGENTGATE_*` environment
//! variables, then flags. Every field of the gateway's configuration can be set from the file
//! and from the environment (`AGENTGATE_<FIELD_IN_UPPER_CASE>`); the common ones also have
//! flags.

use std::path::Path;

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Applies a TOML file (if any) and then environment overrides to `defaults`.
///
/// `flag_env` names the variables that flags fall back to (read by clap, so known too).
pub fn layered<T: Serialize + DeserializeOwned>(
    defaults: T,
    file: Option<&Path>,
    flag_env: &[String],
) -> anyhow::Result<T> {
    let mut table = toml::Table::try_from(&defaults).context("serializing defaults")?;
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let from_file: toml::Table =
            toml::from_str(&text).with_context(|| format!("invalid TOML in {}", path.display()))?;
        for (k, v) in from_file {
            if !table.contains_key(&k) && !is_optional_field(&k) {
                anyhow::bail!("{}: unknown setting {k:?}", path.display());
            }
            table.insert(k, v);
        }
    }
    let keys: Vec<String> = table.keys().cloned().collect();
    for key in keys
        .iter()
        .map(String::as_str)
        .chain(OPTIONAL_FIELDS.iter().copied())
    {
        let var = format!("AGENTGATE_{}", key.to_ascii_uppercase());
        if let Ok(raw) = std::env::var(&var) {
            let value = match table.get(key) {
                // A list setting takes `a,b,c` (or a TOML array) from the environment.
                Some(toml::Value::Array(_)) => parse_env_list(&raw),
                _ => parse_env_value(&raw),
            };
            table.insert(key.to_string(), value);
        }
    }
    warn_unknown_env(&keys, flag_env);
    let t: T = toml::Value::Table(table)
        .try_into()
        .context("invalid setting (from the config file or an AGENTGATE_* variable)")?;
    Ok(t)
}

/// Fields that serialize to nothing while unset (TOML has no null), so they must be listed.
const OPTIONAL_FIELDS: &[&str] = &[
    "tls_cert",
    "tls_key",
    "api_tls_cert",
    "api_tls_key",
    "cleartext_listen",
    "redis",
    "internal_url",
    "internal_secret_file",
    "internal_tls_cert",
    "internal_tls_key",
    "internal_ca_cert",
    "redis_ca_cert",
];

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
fn warn_unknown_env(keys: &[String], flag_env: &[String]) {
    for (var, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
        let Some(setting) = var.strip_prefix("AGENTGATE_") else {
            continue;
        };
        let setting = setting.to_ascii_lowercase();
        let known = keys.contains(&setting)
            || OPTIONAL_FIELDS.contains(&setting.as_str())
            || OTHER_ENV.contains(&var.as_str())
            || flag_env.contains(&var);
        if !known {
            tracing::warn!(
                variable = %var,
                "unknown setting in the environment, ignored: AGENTGATE_<SETTING> takes a \
                 setting's name from docs/configuration.md in upper case"
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

fn is_optional_field(k: &str) -> bool {
    OPTIONAL_FIELDS.contains(&k)
}

/// A list from the environment: a TOML array, or comma-separated strings.
fn parse_env_list(raw: &str) -> toml::Value {
    if raw.trim_start().starts_with('[') {
        if let Some(v) = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
        {
            return v;
        }
    }
    toml::Value::Array(
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| toml::Value::String(s.to_string()))
            .collect(),
    )
}

/// An environment value: a TOML scalar if it parses as one (numbers, booleans), else a string.
fn parse_env_value(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(b) = raw.parse::<bool>() {
        return toml::Value::Boolean(b);
    }
    toml::Value::String(raw.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentgate_gateway::GatewayConfig;
    use std::time::Duration;

    #[test]
    fn file_then_env() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("g.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:9000\"\nhandshake_timeout = \"2s\"\nmax_connections = 5\ntls_cert = \"/c.pem\"\n",
        )
        .unwrap();
        // SAFETY: this test is the only one touching this variable.
        unsafe { std::env::set_var("AGENTGATE_MAX_CONNECTIONS", "7") };
        let c: GatewayConfig = layered(GatewayConfig::default(), Some(&f), &[]).unwrap();
        unsafe { std::env::remove_var("AGENTGATE_MAX_CONNECTIONS") };
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.handshake_timeout, Duration::from_secs(2));
        assert_eq!(c.max_connections, 7);
        assert_eq!(c.tls_cert.as_deref(), Some(Path::new("/c.pem")));
        std::fs::write(&f, "no_such_setting = 1\n").unwrap();
        let err = layered(GatewayConfig::default(), Some(&f), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("no_such_setting"));
    }
}
