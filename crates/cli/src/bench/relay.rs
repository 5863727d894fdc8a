//! The L4 reference of `bench keepalive`: a bare reverse TCP relay, the least a reverse tunnel
//! can cost.
//!
//! It has the shape of rathole or frp: the agent side dials OUT to the relay and keeps a few
//! spare connections open (each says hello with one byte); the relay pairs each client connection with one of them and sends
//! one byte; the agent side then dials the upstream and both ends copy bytes until either side
//! closes. No framing, no multiplexing, no authentication, no TLS: per request it costs two
//! kernel copies on each hop and nothing else. Two processes, like the real thing:
//! `bench-relay server` and `bench-relay agent`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};

/// Spare connections the agent side keeps dialed (rathole keeps a pool as well).
const SPARE: usize = 8;

#[derive(clap::Args)]
pub struct RelayArgs {
    #[command(subcommand)]
    role: Role,
}

#[derive(clap::Subcommand)]
enum Role {
    /// The public side: clients connect to `--client-listen`, agents to `--agent-listen`.
    Server {
        #[arg(long)]
        client_listen: SocketAddr,
        #[arg(long)]
        agent_listen: SocketAddr,
    },
    /// The private side: keeps spare connections to the server, each bridged to `--upstream`
    /// once the server pairs it with a client.
    Agent {
        #[arg(long)]
        server: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
    },
}

pub async fn run(a: RelayArgs) -> anyhow::Result<()> {
    match a.role {
        Role::Server {
            client_listen,
            agent_listen,
        } => server(client_listen, agent_listen).await,
        Role::Agent { server, upstream } => agent(server, upstream).await,
    }
}

#[derive(Default)]
struct Spares {
    idle: Mutex<VecDeque<TcpStream>>,
    arrived: Notify,
}

async fn server(client_listen: SocketAddr, agent_listen: SocketAddr) -> anyhow::Result<()> {
    let spares = Arc::new(Spares::default());
    let agents = TcpListener::bind(agent_listen).await?;
    let clients = TcpListener::bind(client_listen).await?;
    let parked = spares.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = agents.accept().await {
            let _ = s.set_nodelay(true);
            let parked = parked.clone();
            // A spare says hello first, so a port probe is never handed to a client.
            tokio::spawn(async move {
                let mut hello = [0u8; 1];
                if s.read_exact(&mut hello).await.is_ok() {
                    parked.idle.lock().unwrap().push_back(s);
                    parked.arrived.notify_one();
                }
            });
        }
    });
    loop {
        let (mut client, _) = clients.accept().await?;
        client.set_nodelay(true)?;
        let spares = spares.clone();
        tokio::spawn(async move {
            let mut agent = loop {
                let arrived = spares.arrived.notified();
                if let Some(s) = spares.idle.lock().unwrap().pop_front() {
                    break s;
                }
                arrived.await;
            };
            if agent.write_all(b"g").await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut agent).await;
            }
        });
    }
}

async fn agent(server: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
    let spare = Arc::new(Semaphore::new(SPARE));
    loop {
        let permit = spare.clone().acquire_owned().await?;
        let mut s = match TcpStream::connect(server).await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        s.set_nodelay(true)?;
        if s.write_all(b"a").await.is_err() {
            continue;
        }
        tokio::spawn(async move {
            let mut go = [0u8; 1];
            let paired = s.read_exact(&mut go).await.is_ok();
            drop(permit);
            if !paired {
                return;
            }
            if let Ok(mut up) = TcpStream::connect(upstream).await {
                let _ = up.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
            }
        });
    }
}
