//! `agentgate`: the gateway, the agent, token management, and the demo, in one binary.

mod bench;
mod completions_and_man;
mod demo;
mod settings;
mod test_upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use agentgate_agent::{AgentConfig, TransportMode};
use agentgate_gateway::tokens::{self, TokenKind};
use agentgate_gateway::GatewayConfig;
use agentgate_transport::ServerUrl;
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
    /// TOML file with any gateway setting (see docs/configuration.md).
    #[arg(long, env = "AGENTGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Agent port (all four transports).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Extra agent port that never uses TLS.
    #[arg(long)]
    cleartext_listen: Option<SocketAddr>,
    /// Admin port: /healthz, /readyz, /metrics, /api/v1/agents.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Tunnel API port.
    #[arg(long)]
    api_listen: Option<SocketAddr>,
    /// PEM certificate chain for TLS on the agent port.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the agent port.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM certificate chain for TLS on the API port.
    #[arg(long)]
    api_tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the API port.
    #[arg(long)]
    api_tls_key: Option<PathBuf>,
    /// Token store file.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Cluster mode: redis://[:password@]host:port/db or rediss://...
    #[arg(long, env = "AGENTGATE_REDIS")]
    redis: Option<String>,
    /// Internal API listener for other replicas (cluster mode).
    #[arg(long)]
    internal_listen: Option<SocketAddr>,
    /// How other replicas reach this one (default http://<internal-listen>).
    #[arg(long)]
    internal_url: Option<String>,
    /// File with the secret shared by all replicas (cluster mode).
    #[arg(long)]
    internal_secret_file: Option<PathBuf>,
    /// A gateway-side gRPC backend that agents call: SERVICE_PREFIX=URL, e.g.
    /// runner.jobs.v1.=http://127.0.0.1:9000 (http:// for HTTP/2 without TLS, https:// for
    /// TLS). Repeatable; added to the config file's [[backends]].
    #[arg(long = "backend", value_name = "SERVICE_PREFIX=URL")]
    backends: Vec<String>,
    /// Any setting as NAME=VALUE (TOML value syntax; durations like "5s"). Repeatable.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(Args)]
struct AgentArgs {
    /// Gateway URL: grpc://host:port, grpcs://host:port, ws://host:port/path or wss://host:port/path.
    #[arg(long, env = "AGENTGATE_SERVER")]
    server: String,
    /// File holding the agent token (or set AGENTGATE_TOKEN).
    #[arg(long, env = "AGENTGATE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// auto: with a ws/wss URL try direct gRPC first and fall back; grpc; websocket.
    #[arg(long, default_value = "auto", env = "AGENTGATE_TRANSPORT")]
    transport: TransportMode,
    /// CA certificate(s) that sign the gateway's certificate (PEM).
    #[arg(long, env = "AGENTGATE_AGENT_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Verify the gateway's certificate against this name instead of the URL's host.
    #[arg(long, env = "AGENTGATE_AGENT_TLS_SERVER_NAME")]
    tls_server_name: Option<String>,
    /// Do not verify the gateway's certificate (prints a warning). For tests only.
    #[arg(long, env = "AGENTGATE_AGENT_INSECURE_SKIP_TLS_VERIFY")]
    insecure_skip_tls_verify: bool,
    /// Extra header 'Name: value' on the WebSocket upgrade and as gRPC metadata. Repeatable.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// HTTP proxy for egress (http://[user:pass@]host:port); default: HTTPS_PROXY/HTTP_PROXY/NO_PROXY.
    #[arg(long, env = "AGENTGATE_PROXY")]
    proxy: Option<String>,
    /// HTTP upstream as NAME=URL, or a bare URL for `default`. Repeatable.
    #[arg(
        long = "upstream",
        value_name = "[NAME=]URL",
        env = "AGENTGATE_AGENT_UPSTREAM",
        value_delimiter = ','
    )]
    upstreams: Vec<String>,
    /// gRPC upstream URL (http:// for h2c, https:// for TLS).
    #[arg(long, env = "AGENTGATE_AGENT_GRPC_UPSTREAM")]
    grpc_upstream: Option<url::Url>,
    /// CA certificate(s) for https upstreams (PEM).
    #[arg(long, env = "AGENTGATE_AGENT_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// Deadline for connecting to an upstream.
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_UPSTREAM_CONNECT_TIMEOUT")]
    upstream_connect_timeout: Option<Duration>,
    /// Deadline for an HTTP upstream's response head (504 after it).
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_UPSTREAM_RESPONSE_TIMEOUT")]
    upstream_response_timeout: Option<Duration>,
    /// Instance id (default: random per process).
    #[arg(long, env = "AGENTGATE_AGENT_INSTANCE_ID")]
    instance_id: Option<String>,
    /// While on the WebSocket fallback, how often to re-probe direct gRPC.
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_REPROBE_INTERVAL")]
    reprobe_interval: Option<Duration>,
    /// Deadline of a direct-gRPC probe.
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_PROBE_TIMEOUT")]
    probe_timeout: Option<Duration>,
    /// First reconnect backoff ceiling.
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_BACKOFF_INITIAL")]
    backoff_initial: Option<Duration>,
    /// Largest reconnect backoff.
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_BACKOFF_MAX")]
    backoff_max: Option<Duration>,
    /// HTTP/2 PING interval.
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_KEEPALIVE_INTERVAL")]
    keepalive_interval: Option<Duration>,
    /// Idle tunnels kept ready.
    #[arg(long, env = "AGENTGATE_AGENT_POOL_MIN_IDLE")]
    pool_min_idle: Option<usize>,
    /// Tunnels opened at once under demand.
    #[arg(long, env = "AGENTGATE_AGENT_POOL_SCALE_STEP")]
    pool_scale_step: Option<usize>,
    /// Tunnels per connection at most.
    #[arg(long, env = "AGENTGATE_AGENT_POOL_MAX")]
    pool_max: Option<usize>,
    /// Idle lifetime of surplus tunnels.
    #[arg(long, value_parser = humantime::parse_duration, env = "AGENTGATE_AGENT_POOL_IDLE_LIFETIME")]
    pool_idle_lifetime: Option<Duration>,
    /// Sidecar mode: listen here (loopback; a bare PORT means 127.0.0.1:PORT) for gRPC calls
    /// from local processes, and send them to the gateway's backends over this agent's
    /// connection, as this agent. They need no token of their own.
    #[arg(long, value_name = "ADDR", value_parser = parse_local_listen, env = "AGENTGATE_AGENT_LOCAL_LISTEN")]
    local_listen: Option<std::net::SocketAddr>,
    /// Serve /healthz, /readyz (registered with the gateway) and /metrics here, e.g.
    /// 127.0.0.1:9101 (a bare PORT means 127.0.0.1:PORT).
    #[arg(long, value_name = "ADDR", value_parser = parse_local_listen, env = "AGENTGATE_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
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
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(filter)
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
    let text = format!("{e:#}");
    let line = match format {
        LogFormat::Text => format!("agentgate: error: {text}\n"),
        LogFormat::Json => format!(
            "{}\n",
            serde_json::json!({"level": "ERROR", "target": "agentgate", "message": text})
        ),
    };
    let _ = QuietStderr.write_all(line.as_bytes());
}

/// Cancelled on SIGTERM or SIGINT.
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
    let mut c: GatewayConfig =
        settings::layered(GatewayConfig::default(), a.config.as_deref(), &flag_env)?;
    if !a.set.is_empty() {
        let mut table = toml::Table::try_from(&c)?;
        for kv in &a.set {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--set {kv:?}: expected NAME=VALUE"))?;
            let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {v}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(v.to_string()));
            table.insert(k.trim().to_string(), value);
        }
        c = toml::Value::Table(table)
            .try_into()
            .context("invalid --set value")?;
    }
    macro_rules! flag {
        ($field:ident) => {
            if let Some(v) = &a.$field {
                c.$field = v.clone().into();
            }
        };
    }
    flag!(listen);
    flag!(admin_listen);
    flag!(api_listen);
    flag!(tokens);
    if a.redis.is_some() {
        c.redis = a.redis.clone();
    }
    flag!(internal_listen);
    if a.internal_url.is_some() {
        c.internal_url = a.internal_url.clone();
    }
    if a.internal_secret_file.is_some() {
        c.internal_secret_file = a.internal_secret_file.clone();
    }
    if a.cleartext_listen.is_some() {
        c.cleartext_listen = a.cleartext_listen;
    }
    if a.tls_cert.is_some() {
        c.tls_cert = a.tls_cert.clone();
    }
    if a.tls_key.is_some() {
        c.tls_key = a.tls_key.clone();
    }
    if a.api_tls_cert.is_some() {
        c.api_tls_cert = a.api_tls_cert.clone();
    }
    if a.api_tls_key.is_some() {
        c.api_tls_key = a.api_tls_key.clone();
    }
    for spec in &a.backends {
        c.backends.push(backend_flag(spec)?);
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

/// `--local-listen`: `host:port`, or a bare port on 127.0.0.1.
fn parse_local_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is neither host:port (127.0.0.1:9100) nor a port"))
}

fn agent_config(a: &AgentArgs) -> anyhow::Result<AgentConfig> {
    let server = ServerUrl::parse(&a.server)?;
    let token = match (&a.token_file, std::env::var("AGENTGATE_TOKEN")) {
        (Some(f), _) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read token file {}", f.display()))?
            .trim()
            .to_string(),
        (None, Ok(t)) => t.trim().to_string(),
        (None, Err(_)) => {
            anyhow::bail!("no agent token: give --token-file FILE or set AGENTGATE_TOKEN")
        }
    };
    if token.is_empty() {
        anyhow::bail!("the agent token is empty");
    }
    let mut c = AgentConfig::new(server, token);
    c.token_file = a.token_file.clone();
    c.transport = a.transport;
    if a.transport == TransportMode::Websocket && !c.server.scheme.is_websocket() {
        anyhow::bail!("--transport websocket needs a ws:// or wss:// URL (it carries the path)");
    }
    c.ca_cert = a.ca_cert.clone();
    c.tls_server_name = a.tls_server_name.clone();
    c.insecure_skip_tls_verify = a.insecure_skip_tls_verify;
    for h in &a.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("--header {h:?}: expected 'Name: value'"))?;
        c.headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    c.proxy = a.proxy.clone();
    c.local_listen = a.local_listen;
    c.metrics_listen = a.metrics_listen;
    for u in &a.upstreams {
        let (name, url) = match u.split_once('=') {
            Some((n, url)) if !n.contains("://") => (n.to_string(), url),
            _ => ("default".to_string(), u.as_str()),
        };
        let url = url::Url::parse(url).with_context(|| format!("--upstream {u:?}: invalid URL"))?;
        if !matches!(url.scheme(), "http" | "https") {
            anyhow::bail!("--upstream {u:?}: only http:// and https:// upstreams are supported");
        }
        c.http_upstreams.push((name, url));
    }
    c.grpc_upstream = a.grpc_upstream.clone();
    c.upstream_ca = a.upstream_ca.clone();
    if let Some(id) = &a.instance_id {
        c.instance_id = id.clone();
    }
    macro_rules! opt {
        ($arg:ident => $($field:ident).+) => {
            if let Some(v) = a.$arg {
                c.$($field).+ = v;
            }
        };
    }
    opt!(upstream_connect_timeout => upstream_connect_timeout);
    opt!(upstream_response_timeout => upstream_response_timeout);
    opt!(reprobe_interval => reprobe_interval);
    opt!(probe_timeout => probe_timeout);
    opt!(backoff_initial => backoff_initial);
    opt!(backoff_max => backoff_max);
    opt!(keepalive_interval => keepalive_interval);
    opt!(pool_min_idle => pool.min_idle);
    opt!(pool_scale_step => pool.scale_step);
    opt!(pool_max => pool.max);
    opt!(pool_idle_lifetime => pool.idle_lifetime);
    opt!(tunnel_protocol => pool.protocol_version);
    Ok(c)
}

/// `agent --check`: one line per step on stdout, the exit status says whether all passed.
async fn agent_check(c: AgentConfig) -> anyhow::Result<()> {
    let server = c.server.to_string();
    let steps = agentgate_agent::check::check(c).await;
    println!("agentgate agent check: {server}");
    for s in &steps {
        println!(
            "  {}  {}: {}",
            if s.ok { "ok    " } else { "FAILED" },
            s.what,
            s.detail
        );
    }
    let failed = steps.iter().filter(|s| !s.ok).count();
    if failed > 0 {
        anyhow::bail!("{failed} of {} checks failed", steps.len());
    }
    println!("all {} checks passed", steps.len());
    Ok(())
}

fn token_command(cmd: TokenCommand) -> anyhow::Result<()> {
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
            if let (Some(_), Some(_)) = (&from_file, expires_in) {
                anyhow::bail!("--expires-in is for generated tokens; an imported token keeps its own lifetime");
            }
            if let Some(file) = from_file {
                let value = std::fs::read_to_string(&file).with_context(|| {
                    format!("cannot read the token to import from {}", file.display())
                })?;
                let entry = tokens::import_token(&path, kind, &name, &agents, &value)?;
                eprintln!(
                    "imported {:?} token {} for {:?} into {} (only its hash is stored)",
                    entry.kind,
                    entry.id,
                    entry.name,
                    path.display()
                );
                return Ok(());
            }
            let (token, entry) =
                tokens::create_token_expiring(&path, kind, &name, &agents, expires_in)?;
            eprintln!(
                "created {:?} token {} for {:?} in {} (shown once; only its hash is stored)",
                entry.kind,
                entry.id,
                entry.name,
                path.display()
            );
            println!("{token}");
        }
        TokenCommand::List { tokens: path } => {
            println!(
                "{:<18} {:<6} {:<24} {:<20} {:<20} AGENTS",
                "ID", "KIND", "NAME", "CREATED", "EXPIRES"
            );
            for t in tokens::list_tokens(&path)? {
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
                println!(
                    "{:<18} {:<6} {:<24} {:<20} {:<20} {}",
                    t.id, kind, t.name, created, expires, agents
                );
            }
        }
        TokenCommand::Revoke {
            id_or_name,
            tokens: path,
        } => {
            for t in tokens::revoke_tokens(&path, &id_or_name)? {
                println!("revoked {} ({:?} {:?})", t.id, t.kind, t.name);
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.command {
            Command::Server(a) => {
                let c = server_config(&a)?;
                if a.print_config {
                    print!("{}", toml::to_string_pretty(&c)?);
                    return Ok(());
                }
                agentgate_gateway::run(c, stop_on_signals(), |_| {}).await
            }
            Command::Agent(a) => {
                let c = agent_config(&a)?;
                if a.check {
                    return agent_check(c).await;
                }
                agent_ignores_sighup();
                agentgate_agent::run(c, stop_on_signals()).await
            }
            Command::Token { command } => token_command(command),
            Command::Completions { shell } => {
                completions_and_man::print_completions(
                    <Cli as clap::CommandFactory>::command(),
                    shell,
                );
                Ok(())
            }
            Command::Man { out_dir } => completions_and_man::write_man_pages(
                <Cli as clap::CommandFactory>::command(),
                &out_dir,
            ),
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
