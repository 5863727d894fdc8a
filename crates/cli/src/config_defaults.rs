//! `agentgate config defaults`: every setting with its meaning and its default, as a TOML file
//! that `--config` takes back. Printed from the settings types themselves (their doc comments
//! and their `Default`), so it cannot drift from the code.

use std::fmt::Write;

use agentgate_gateway::config::BackendConfig;
use agentgate_gateway::GatewayConfig;
use documented::DocumentedFields;
use serde::Serialize;

use crate::agent_settings::AgentSettings;

/// The gateway's settings (`agentgate server --config`).
pub fn server() -> anyhow::Result<String> {
    let mut out = header(
        "agentgate server",
        "AGENTGATE_<NAME> environment variables, --set NAME=VALUE, then the flags of \
         `agentgate server`",
    );
    fields::<GatewayConfig>(&mut out, "", &["backends"], |_| None)?;
    // Backends have no default: show one table's keys, commented out.
    comment(&mut out, GatewayConfig::get_field_docs("backends")?);
    out.push_str(
        "# Each [[backends]] table takes these keys; `services` and `url` are required, the \
         others are shown with their defaults.\n#[[backends]]\n",
    );
    fields::<BackendConfig>(&mut out, "#", &[], |_| None)?;
    Ok(out)
}

/// The agent's settings (`agentgate agent --config`); `agent` is the clap model of
/// `agentgate agent`, which names each setting's flag and variable.
pub fn agent(agent: &clap::Command) -> anyhow::Result<String> {
    let mut out = header(
        "agentgate agent",
        "then each setting's environment variable, then its flag",
    );
    fields::<AgentSettings>(&mut out, "", &[], |name| {
        let arg = agent.get_arguments().find(|a| a.get_id() == name)?;
        let long = arg.get_long()?;
        Some(match arg.get_env() {
            Some(env) => format!("Flag --{long}, variable {}.", env.to_string_lossy()),
            None => format!("Flag --{long}."),
        })
    })?;
    Ok(out)
}

/// The clap model of `agentgate`, with each setting's default in its flag's help. The
/// defaults live in the settings types, not in clap: a flag left out must stay "not given"
/// so that the file and the environment below it can set it.
pub fn command() -> clap::Command {
    let server = toml::Table::try_from(GatewayConfig::default()).unwrap_or_default();
    let agent = toml::Table::try_from(AgentSettings::default()).unwrap_or_default();
    <crate::Cli as clap::CommandFactory>::command()
        .mut_subcommand("server", |c| with_defaults_in_help(c, &server))
        .mut_subcommand("agent", |c| with_defaults_in_help(c, &agent))
}

fn with_defaults_in_help(cmd: clap::Command, defaults: &toml::Table) -> clap::Command {
    let shown: Vec<(String, String)> = cmd
        .get_arguments()
        .filter_map(|a| {
            let text = match defaults.get(a.get_id().as_str())? {
                toml::Value::String(s) => s.clone(),
                toml::Value::Array(items) if items.is_empty() => return None,
                other => other.to_string(),
            };
            Some((a.get_id().to_string(), text))
        })
        .collect();
    shown.into_iter().fold(cmd, |cmd, (id, default)| {
        cmd.mut_arg(id, |a| {
            let help = a.get_help().map(ToString::to_string).unwrap_or_default();
            a.help(format!("{help} [default: {default}]"))
        })
    })
}

fn header(command: &str, above_file: &str) -> String {
    format!(
        "# Settings of `{command}`, each with its default ({}).\n\
         # Layers, each overriding the one before: these defaults, this file (--config), \
         {above_file}.\n\n",
        agentgate_proto::build_info::LONG_VERSION
    )
}

/// Each field of `T` in declaration order: its doc comment, then `name = default`, or the
/// name commented out when it is unset by default. `prefix` comments the values out.
fn fields<T: Serialize + Default + DocumentedFields>(
    out: &mut String,
    prefix: &str,
    skip: &[&str],
    also: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    let defaults = toml::Table::try_from(T::default())?;
    for (name, doc) in T::FIELD_NAMES.iter().zip(T::FIELD_DOCS) {
        if skip.contains(name) {
            continue;
        }
        comment(out, doc);
        if let Some(more) = also(name) {
            comment(out, &more);
        }
        match defaults.get(*name) {
            Some(value) => writeln!(out, "{prefix}{name} = {value}")?,
            None => writeln!(out, "# Unset by default.\n#{name} =")?,
        }
        out.push('\n');
    }
    Ok(())
}

fn comment(out: &mut String, doc: &str) {
    for line in doc.lines().map(str::trim_end) {
        out.push('#');
        if !line.is_empty() {
            out.push(' ');
            out.push_str(line);
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_defaults_read_back_as_the_defaults() {
        let text = server().unwrap();
        let printed: GatewayConfig = toml::from_str(&text).unwrap();
        assert_eq!(
            toml::Table::try_from(printed).unwrap(),
            toml::Table::try_from(GatewayConfig::default()).unwrap()
        );
        // The backend keys are there, commented out.
        assert!(text.contains("#[[backends]]\n") && text.contains("#max_calls_per_agent = 100"));
        assert!(text.contains("# Unset by default.\n#tls_cert =\n"));
        let cli = <crate::Cli as clap::CommandFactory>::command();
        let text = agent(cli.find_subcommand("agent").unwrap()).unwrap();
        assert!(text.contains("# Flag --upstream, variable AGENTGATE_AGENT_UPSTREAM.\n"));
        let printed: AgentSettings = toml::from_str(&text).unwrap();
        assert_eq!(
            toml::Table::try_from(printed).unwrap(),
            toml::Table::try_from(AgentSettings::default()).unwrap()
        );
    }
}
