//! `agentgate`: the gateway, the agent, token management, and the demo, in one binary.

mod agent_settings;
mod bench;
mod completions_and_man;
mod config_defaults;
mod demo;
mod settings;
mod stdout;
mod test_upstream;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use agent_settings::AgentSettings;
use agentgate_agent::AgentConfig;
use agentgate_gateway::tokens::{self, TokenKind};
use agentgate_gateway::GatewayConfig;
use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "agentgate",
    version = agentgate_proto::build_info::LONG_VERSION,
    about = "Agent gateway: gRPC ingress on one port (grpc, grpcs, ws, wss) and a reverse tunnel to services next to agents"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "AGENTGATE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), for example `info` or `agentgate_gateway=debug`.
    #[arg(long, global = true, default_value = "info", env = "AGENTGATE_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Server(Box<ServerArgs>),
    /// Run an agent.
    Agent(Box<AgentArgs>),
    /// Manage agent and API tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Start a gateway, a small upstream and one agent per transport in this process, measure
    /// requests through each, print a table, and keep running for manual requests.
    Demo(demo::DemoArgs),
    /// Benchmarks: transports side by side (markdown table on stdout, --json for machines).
    Bench(bench::BenchArgs),
    /// Settings: `agentgate config defaults` prints every setting with its meaning and default.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (agentgate.1, agentgate-server.1, ...) into a directory.
    Man {
        /// Directory to write the pages into (created if missing).
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
    /// Internal: many agents in one process, for `bench`.
    #[command(hide = true)]
    BenchLoad(bench::load::LoadArgs),
    /// Internal: the bare tonic reverse tunnel that `bench` compares against.
    #[command(hide = true)]
    BenchControl(bench::control::ControlArgs),
    /// One process of hostile connections for `bench hostile` (internal).
    #[command(hide = true)]
    BenchAttack(bench::attack::AttackArgs),
    /// Internal: the bare reverse TCP relay that `bench keepalive` compares against.
    #[command(hide = true)]
    BenchRelay(bench::relay::RelayArgs),
    /// Internal: the one-thread HTTP/1.1 keep-alive load generator of `bench keepalive`.
    #[command(hide = true)]
    BenchHttp1(bench::keepalive::Http1LoadArgs),
    /// The gateway-side gRPC backend of `bench backends` (internal).
    #[command(hide = true)]
    BenchBackend(bench::job_backend::JobBackendArgs),
    /// Internal: COUNT agent tokens named PREFIX00000.. in one write of the store, printed one
    /// per line (distinct agents for scripts/cluster-scale).
    #[command(hide = true)]
    BenchTokens {
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long)]
        prefix: String,
        #[arg(long)]
        count: usize,
    },
}

#[derive(Args)]
struct ServerArgs {
    /// TOML file with any gateway setting (`agentgate config defaults` prints them all).
    #[arg(long, env = "AGENTGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: ServerFlags,
    /// A gateway-side gRPC backend that agents call: SERVICE_PREFIX=URL, e.g.
    /// runner.jobs.v1.=http://127.0.0.1:9000 (http:// for HTTP/2 without TLS, https:// for
    /// TLS). Repeatable; added to the config file's [[backends]].
    #[arg(long = "backend", value_name = "SERVICE_PREFIX=URL")]
    backends: Vec<String>,
    /// Any setting as NAME=VALUE (TOML value syntax; durations like "5s"). Repeatable; wins
    /// over the file and the environment, loses to the flags above.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

/// The settings common enough to have flags of their own: the last layer of the gateway's
/// settings (crate::settings), serialized with only the flags given.
#[derive(Args, serde::Serialize)]
#[command(next_help_heading = "Listeners and files (each also a setting)")]
struct ServerFlags {
    /// Agent port (all four transports).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<SocketAddr>,
    /// Extra agent port that never uses TLS.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cleartext_listen: Option<SocketAddr>,
    /// Admin port: /healthz, /readyz, /metrics, /api/v1/agents.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    admin_listen: Option<SocketAddr>,
    /// Tunnel API port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    api_listen: Option<SocketAddr>,
    /// PEM certificate chain for TLS on the agent port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the agent port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<PathBuf>,
    /// PEM certificate chain for TLS on the API port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    api_tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the API port.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    api_tls_key: Option<PathBuf>,
    /// Token store file.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<PathBuf>,
    /// Cluster mode: redis://[:password@]host:port/db, rediss://..., or
    /// redis+sentinel://host:port[,host:port]/MASTER[/db] (rediss+sentinel:// for TLS).
    #[arg(long, env = "AGENTGATE_REDIS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    redis: Option<String>,
    /// Internal API listener for other replicas (cluster mode).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    internal_listen: Option<SocketAddr>,
    /// How other replicas reach this one (default http://<internal-listen>).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    internal_url: Option<String>,
    /// File with the secret shared by all replicas (cluster mode).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    internal_secret_file: Option<PathBuf>,
}

#[derive(Args)]
struct AgentArgs {
    /// TOML file with any agent setting (`agentgate config defaults --for agent` prints them
    /// all); the environment and the flags win over it.
    #[arg(long, env = "AGENTGATE_AGENT_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: AgentSettings,
    /// Try the configuration once and report each step (name resolution, connecting and
    /// registering, the transport used and why, each upstream), then exit: 0 when every step
    /// passed, 2 otherwise.
    #[arg(long)]
    check: bool,
    /// Tunnel protocol version to announce (1 behaves like agents before 0.2; for testing).
    #[arg(long, hide = true, value_parser = clap::value_parser!(u32).range(1..=2))]
    tunnel_protocol: Option<u32>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print every setting with its doc comment and default, as a TOML file that --config
    /// takes (change what you need, delete the rest).
    Defaults {
        /// Whose settings.
        #[arg(long = "for", value_enum, default_value = "server")]
        of: ConfigOf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ConfigOf {
    Server,
    Agent,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; it is printed once and only its hash is stored.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, env = "AGENTGATE_TOKENS")]
        tokens: PathBuf,
        #[arg(long, value_enum, default_value = "agent")]
        kind: KindArg,
        /// API tokens only: an agent this token may reach. Repeatable; none means all.
        #[arg(long = "agent")]
        agents: Vec<String>,
        /// Register the token in this file instead of generating one (for example the token
        /// file an agentk already uses with kas); only its hash is stored, nothing is printed.
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        /// Refuse the token after this long (`30d`, `12h`); what it authenticated then ends,
        /// as for a revoked token. Default: no expiry.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
    },
    /// List stored tokens (ids, kinds, names; never the tokens).
    List {
        #[arg(long, env = "AGENTGATE_TOKENS")]
        tokens: PathBuf,
    },
    /// Revoke by token id, or every token with this name.
    Revoke {
        id_or_name: String,
        #[arg(long, env = "AGENTGATE_TOKENS")]
        tokens: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Agent,
    Api,
}

/// Sets up the log; a filter that does not parse is an error, not a silent `info`.
fn init_logging(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    // The h2 library warns on what a hostile peer does (a stream reset flood, say) with no
    // connection, peer or budget; the gateway logs those events itself within its
    // pre-authentication budget. Its lines show only when the filter names h2.
    let with_h2 = if filter.contains("h2") {
        filter.to_string()
    } else {
        format!("{filter},h2=error")
    };
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(&with_h2)
        .map_err(|e| {
            anyhow::anyhow!(
                "--log {filter:?} is not a log filter ({e}); use a level such as info or \
                 directives such as info,agentgate_gateway=debug"
            )
        })?;
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| QuietStderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// Standard error that never fails: a closed pipe (the reader of the log went away) must not
/// stop the process, and Rust's `eprintln!` would panic on it.
struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// The last words of a process that cannot go on, in the log's format, never panicking.
fn report_fatal(format: LogFormat, e: &anyhow::Error) {
    use std::io::Write;
    let text = agentgate_transport::error_chain::describe(e.as_ref());
    let line = match format {
        LogFormat::Text => format!("agentgate: error: {text}\n"),
        // The fields of the log's own JSON lines, the timestamp as tracing writes it.
        LogFormat::Json => format!(
            "{}\n",
            serde_json::json!({
                "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now())
                    .to_string(),
                "level": "ERROR",
                "target": "agentgate",
                "message": text,
            })
        ),
    };
    let _ = QuietStderr.write_all(line.as_bytes());
}

/// Cancelled on SIGTERM or SIGINT. A second one during the graceful shutdown exits at once
/// (status 130), as an operator pressing Ctrl-C twice expects; requests still in flight are
/// cut.
fn stop_on_signals() -> CancellationToken {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
        s.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::warn!("second SIGTERM or SIGINT during shutdown: exiting now, without the grace");
        std::process::exit(130);
    });
    stop
}

/// The agent's SIGHUP: nothing to reload at once (the token file is re-read whenever it
/// changed, before each connection), so it is logged instead of ending the process, which is
/// what SIGHUP does by default (`systemctl reload`, a closed terminal).
fn agent_ignores_sighup() {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!(
                "SIGHUP received: the agent keeps running; a changed token file is used from \
                 its next connection"
            );
        }
    });
}

fn server_config(a: &ServerArgs) -> anyhow::Result<GatewayConfig> {
    let flag_env = settings::flag_env_names(&<Cli as clap::CommandFactory>::command());
    let mut c: GatewayConfig = settings::layered(
        a.config.as_deref(),
        settings::EnvLayer::Prefixed("AGENTGATE_"),
        &a.set,
        &a.flags,
        &flag_env,
    )?;
    for spec in &a.backends {
        c.backends.push(backend_flag(spec)?);
    }
    // The names logs and metrics will use, so that --print-config shows them.
    for b in &mut c.backends {
        b.name = b.effective_name();
    }
    Ok(c)
}

/// `--backend SERVICE_PREFIX=URL`: a backend with every other setting at its default, named
/// after its prefix.
fn backend_flag(spec: &str) -> anyhow::Result<agentgate_gateway::config::BackendConfig> {
    let (prefix, url) = spec
        .split_once('=')
        .filter(|(p, u)| !p.trim().is_empty() && !u.trim().is_empty())
        .with_context(|| {
            format!("--backend {spec:?}: expected SERVICE_PREFIX=URL, e.g. runner.jobs.v1.=http://127.0.0.1:9000")
        })?;
    Ok(agentgate_gateway::config::BackendConfig {
        services: vec![prefix.trim().to_string()],
        url: url.trim().to_string(),
        ..Default::default()
    })
}

/// The agent's settings in layers (crate::settings): defaults, the config file, the
/// environment, the flags.
fn agent_settings(a: &AgentArgs) -> anyhow::Result<AgentSettings> {
    let flag_env = settings::flag_env_names(&<Cli as clap::CommandFactory>::command());
    settings::layered(
        a.config.as_deref(),
        settings::EnvLayer::WithTheFlags("AGENTGATE_AGENT_"),
        &[],
        &a.settings,
        &flag_env,
    )
}

/// The agent's configuration: its layered settings, then the token.
fn agent_config(a: &AgentArgs, settings: &AgentSettings) -> anyhow::Result<AgentConfig> {
    let mut c = settings.to_config()?;
    if let Some(v) = a.tunnel_protocol {
        c.pool.protocol_version = v;
    }
    Ok(c)
}

/// The worker threads of this process's runtime: the command's own setting where it has one
/// (`agent`: its settings, read once before the runtime), else TOKIO_WORKER_THREADS, else one
/// per core (tokio's choice, which follows a container's CPU limit). The variable is checked
/// here because tokio panics on a bad one.
fn worker_threads(
    command: &Command,
    agent: Option<&AgentSettings>,
) -> anyhow::Result<Option<NonZeroUsize>> {
    let own = match command {
        Command::BenchLoad(a) => a.worker_threads,
        _ => agent.and_then(|s| s.worker_threads),
    };
    if own.is_some() {
        return Ok(own);
    }
    let bad = || {
        anyhow::anyhow!(
            "TOKIO_WORKER_THREADS must be a number of threads, at least 1; unset it for one per core"
        )
    };
    match std::env::var("TOKIO_WORKER_THREADS") {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(bad()),
        Ok(v) => v.trim().parse().map(Some).map_err(|_| bad()),
    }
}

/// The process's runtime, with the worker threads `worker_threads` chooses.
fn runtime(
    command: &Command,
    agent: Option<&AgentSettings>,
) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads(command, agent)? {
        builder.worker_threads(n.get());
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the runtime's worker threads")
}

async fn agent_check(c: AgentConfig) -> anyhow::Result<()> {
    let server = c.server.to_string();
    let steps = agentgate_agent::check::check(c).await;
    stdout::line(format!("agentgate agent check: {server}"))?;
    for s in &steps {
        stdout::line(format!(
            "  {}  {}: {}",
            if s.ok { "ok    " } else { "FAILED" },
            s.what,
            s.detail
        ))?;
    }
    let failed = steps.iter().filter(|s| !s.ok).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} checks failed", steps.len());
    }
    stdout::line(format!("all {} checks passed", steps.len()))?;
    Ok(())
}

fn token_command(cmd: TokenCommand) -> anyhow::Result<()> {
    use std::io::Write;
    match cmd {
        TokenCommand::Create {
            name,
            tokens: path,
            kind,
            agents,
            from_file,
            expires_in,
        } => {
            let kind = match kind {
                KindArg::Agent => TokenKind::Agent,
                KindArg::Api => TokenKind::Api,
            };
            if kind == TokenKind::Agent && !agents.is_empty() {
                anyhow::bail!(
                    "--agent applies to API tokens (the agents one may reach); an agent token's \
                     agent is its --name: drop --agent, or add --kind api"
                );
            }
            if expires_in.is_some_and(|d| d.is_zero()) {
                anyhow::bail!("--expires-in 0s would make a token that is expired already; give a lifetime such as 12h or 30d, or leave it out for no expiry");
            }
            if let (Some(_), Some(_)) = (&from_file, expires_in) {
                anyhow::bail!("--expires-in is for generated tokens; an imported token keeps its own lifetime");
            }
            if let Some(file) = from_file {
                let value = std::fs::read_to_string(&file).with_context(|| {
                    format!("cannot read the token to import from {}", file.display())
                })?;
                let entry = tokens::import_token(&path, kind, &name, &agents, &value)?;
                let _ = writeln!(
                    QuietStderr,
                    "imported {} token {} for {:?} into {} (only its hash is stored)",
                    entry.kind.label(),
                    entry.id,
                    entry.name,
                    path.display()
                );
                return Ok(());
            }
            let (token, entry) =
                tokens::create_token_expiring(&path, kind, &name, &agents, expires_in)?;
            let _ = writeln!(
                QuietStderr,
                "created {} token {} for {:?} in {} (shown once; only its hash is stored)",
                entry.kind.label(),
                entry.id,
                entry.name,
                path.display()
            );
            stdout::line(token)?;
        }
        TokenCommand::List { tokens: path } => {
            let listed = tokens::list_tokens(&path)?;
            stdout::line(format!(
                "{:<18} {:<6} {:<24} {:<20} {:<20} AGENTS",
                "ID", "KIND", "NAME", "CREATED", "EXPIRES"
            ))?;
            for t in listed {
                let created = humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_secs(t.created_at),
                );
                let kind = match t.kind {
                    TokenKind::Agent => "agent",
                    TokenKind::Api => "api",
                };
                let agents = if t.kind == TokenKind::Api && t.agents.is_empty() {
                    "*".to_string()
                } else {
                    t.agents.join(",")
                };
                let expires = match t.expires_at {
                    None => "never".to_string(),
                    Some(at) if t.expired() => format!(
                        "{} (expired)",
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_secs(at)
                        )
                    ),
                    Some(at) => humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + Duration::from_secs(at),
                    )
                    .to_string(),
                };
                stdout::line(format!(
                    "{:<18} {:<6} {:<24} {:<20} {:<20} {}",
                    t.id, kind, t.name, created, expires, agents
                ))?;
            }
        }
        TokenCommand::Revoke {
            id_or_name,
            tokens: path,
        } => {
            for t in tokens::revoke_tokens(&path, &id_or_name)? {
                stdout::line(format!("revoked {} ({:?} {:?})", t.id, t.kind, t.name))?;
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = {
        use clap::FromArgMatches;
        Cli::from_arg_matches(&config_defaults::command().get_matches())
            .unwrap_or_else(|e| e.exit())
    };
    // One process-wide TLS provider (ring) for libraries that build configs themselves.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let format = cli.log_format;
    if let Err(e) = init_logging(format, &cli.log) {
        report_fatal(format, &e);
        return std::process::ExitCode::from(2);
    }
    if let Command::BenchHttp1(a) = cli.command {
        // One thread, like `wrk -t1`: this command builds its own runtime.
        return match bench::keepalive::run_load(a) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                report_fatal(format, &e);
                std::process::ExitCode::from(2)
            }
        };
    }
    // The agent's settings size its runtime, so they are read (once) before it.
    let started = (|| {
        let agent = match &cli.command {
            Command::Agent(a) => Some(agent_settings(a)?),
            _ => None,
        };
        anyhow::Ok((runtime(&cli.command, agent.as_ref())?, agent))
    })();
    let (rt, agent) = match started {
        Ok(started) => started,
        Err(e) => {
            report_fatal(format, &e);
            return std::process::ExitCode::from(2);
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Server(a) => {
                let c = server_config(&a)?;
                if a.print_config {
                    return stdout::write(toml::to_string_pretty(&c)?);
                }
                agentgate_gateway::run(c, stop_on_signals(), |_| {}).await
            }
            Command::Agent(a) => {
                let settings = agent.expect("read before the runtime");
                let c = agent_config(&a, &settings)?;
                if a.check {
                    return agent_check(c).await;
                }
                agent_ignores_sighup();
                agentgate_agent::run(c, stop_on_signals()).await
            }
            Command::Token { command } => token_command(command),
            Command::Config {
                command: ConfigCommand::Defaults { of },
            } => stdout::write(match of {
                ConfigOf::Server => config_defaults::server()?,
                ConfigOf::Agent => config_defaults::agent(
                    <Cli as clap::CommandFactory>::command()
                        .find_subcommand("agent")
                        .expect("the agent command"),
                )?,
            }),
            Command::Completions { shell } => {
                completions_and_man::print_completions(config_defaults::command(), shell)
            }
            Command::Man { out_dir } => {
                completions_and_man::write_man_pages(config_defaults::command(), &out_dir)
            }
            Command::Demo(a) => demo::run(a, stop_on_signals()).await,
            Command::Bench(a) => bench::run(a).await,
            Command::BenchLoad(a) => bench::load::run(a, stop_on_signals()).await,
            Command::BenchControl(a) => bench::control::run(a).await,
            Command::BenchAttack(a) => bench::attack::run(a).await,
            Command::BenchRelay(a) => bench::relay::run(a).await,
            Command::BenchBackend(a) => bench::job_backend::run(a).await,
            Command::BenchTokens {
                tokens,
                prefix,
                count,
            } => {
                let names: Vec<String> = (0..count).map(|i| format!("{prefix}{i:05}")).collect();
                let created = tokens::create_agent_tokens(&tokens, &names)?;
                use std::io::Write;
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                for t in created {
                    writeln!(out, "{t}")?;
                }
                Ok(())
            }
            Command::BenchHttp1(_) => unreachable!("run before the runtime is built"),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            report_fatal(format, &e);
            std::process::ExitCode::from(2)
        }
    }
}
