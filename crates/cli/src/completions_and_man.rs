//! Shell completions and manual pages, generated from the same clap definitions as `--help`,
//! so they cannot drift from the flags (the Debian package ships both).

use std::path::Path;

use anyhow::Context;

/// The completion script for `shell` on stdout (made whole first: clap_complete panics on a
/// failed write).
pub fn print_completions(
    mut cmd: clap::Command,
    shell: clap_complete::Shell,
) -> anyhow::Result<()> {
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    crate::stdout::write(script)
}

/// `agentgate.1` and one page per visible subcommand (`agentgate-server.1`,
/// `agentgate-token-create.1`, ...) in `dir`.
pub fn write_man_pages(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = cmd;
    cmd.build();
    write_page(&cmd, cmd.get_name(), dir)
}

fn write_page(cmd: &clap::Command, page_name: &str, dir: &Path) -> anyhow::Result<()> {
    let page = cmd.clone().name(page_name.to_string());
    let mut text = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut text)
        .context("rendering a manual page")?;
    let path = dir.join(format!("{page_name}.1"));
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_page(sub, &format!("{page_name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_visible_command_gets_a_page_and_hidden_ones_none() {
        let dir = tempfile::tempdir().unwrap();
        super::write_man_pages(crate::Cli::command(), dir.path()).unwrap();
        let server = std::fs::read_to_string(dir.path().join("agentgate-server.1")).unwrap();
        assert!(server.contains("tokens"), "the server page lists its flags");
        assert!(dir.path().join("agentgate-token-create.1").exists());
        assert!(!dir.path().join("agentgate-bench-load.1").exists());
    }

    #[test]
    fn agent_flags_fall_back_to_named_variables_that_count_as_known() {
        let names = crate::settings::flag_env_names(&crate::Cli::command());
        for n in [
            "AGENTGATE_SERVER",
            "AGENTGATE_AGENT_CA_CERT",
            "AGENTGATE_AGENT_UPSTREAM",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
    }
}
