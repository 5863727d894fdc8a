//! The agent port: every connection the ingress classified (`transport::serve_ingress`, all
//! four transports, and the cleartext port if there is one) on ONE tonic server, behind the
//! layers that look at each call before a service does (docs/ARCHITECTURE.md, "One port, one
//! gRPC server").

use std::sync::Arc;

use agentgate_proto::v1::agent_session_server::AgentSessionServer;
use agentgate_proto::v1::tunnel_server::TunnelServer;
use agentgate_transport::{
    serve_ingress, ConnectionLimit, IngressSettings, ServerConn, WsSettings,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{
    auth, backends, rpc_guard, rpc_layer, session, status_in_trailers, tunnel, Gateway,
    GatewayConfig,
};

/// The ingress limits and deadlines, from the configuration.
fn ingress_settings(cfg: &GatewayConfig) -> anyhow::Result<IngressSettings> {
    Ok(IngressSettings {
        handshake_timeout: cfg.handshake_timeout,
        listen_backlog: cfg.listen_backlog,
        min_client_ping_interval: (!cfg.min_client_ping_interval.is_zero())
            .then_some(cfg.min_client_ping_interval),
        auth_timeout: (!cfg.auth_timeout.is_zero()).then_some(cfg.auth_timeout),
        max_connections_per_source: cfg.max_connections_per_source,
        max_handshakes_per_source: cfg.max_handshakes_per_source,
        max_bytes_before_auth: (cfg.max_bytes_before_auth > 0).then_some(cfg.max_bytes_before_auth),
        max_streams_before_auth: (cfg.max_streams_before_auth > 0)
            .then_some(cfg.max_streams_before_auth),
        proxy_protocol_from: cfg.proxy_protocol_networks()?,
        max_connection_age: (!cfg.max_connection_age.is_zero()).then_some(cfg.max_connection_age),
        ws: WsSettings {
            read_buffer_size: cfg.ws_read_buffer_size,
            max_message_size: cfg.ws_max_message_size,
            ..WsSettings::default()
        },
    })
}

/// Starts serving the agent port. `accept_stop` stops accepting; `server_stop` sends every
/// connection GOAWAY, and the task ends once they all closed.
pub async fn serve(
    gw: &Gateway,
    listener: TcpListener,
    cleartext: Option<TcpListener>,
    tls: Option<Arc<rustls::ServerConfig>>,
    accept_stop: CancellationToken,
    server_stop: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let cfg = &gw.config;
    let settings = ingress_settings(cfg)?;
    let limit = ConnectionLimit::new(
        cfg.max_connections,
        (cfg.max_bytes_before_auth_total > 0).then_some(cfg.max_bytes_before_auth_total),
    );
    type Incoming =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = std::io::Result<ServerConn>> + Send>>;
    let mut incoming: Incoming = Box::pin(serve_ingress(
        listener,
        tls,
        settings.clone(),
        gw.metrics.clone(),
        limit.clone(),
        accept_stop.clone(),
    ));
    if let Some(l) = cleartext {
        let more = serve_ingress(l, None, settings, gw.metrics.clone(), limit, accept_stop);
        incoming = Box::pin(incoming.merge(more));
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    health
        .set_serving::<AgentSessionServer<session::SessionService>>()
        .await;
    health
        .set_serving::<TunnelServer<tunnel::TunnelService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(agentgate_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Every service takes gzip-compressed requests: GitLab's agentk compresses every call
    // (`grpc.UseCompressor(gzip)`). Answers go out uncompressed, which every client accepts;
    // docs/compat.md has the measurement behind that choice.
    let gzip = tonic::codec::CompressionEncoding::Gzip;
    let health_service = health_service
        .accept_compressed(gzip)
        .max_decoding_message_size(cfg.max_message_size_health);
    let reflection_v1 = reflection()
        .build_v1()?
        .accept_compressed(gzip)
        .max_decoding_message_size(cfg.max_message_size_reflection);
    let reflection_v1alpha = reflection()
        .build_v1alpha()?
        .accept_compressed(gzip)
        .max_decoding_message_size(cfg.max_message_size_reflection);

    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(cfg.keepalive_interval))
        .http2_keepalive_timeout(Some(cfg.keepalive_timeout))
        .initial_stream_window_size(cfg.http2_stream_window)
        .initial_connection_window_size(cfg.http2_connection_window)
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(cfg.max_pending_accept_reset_streams))
        .http2_max_local_error_reset_streams(Some(cfg.max_local_error_reset_streams));
    if !cfg.max_connection_age.is_zero() {
        builder = builder
            .max_connection_age(cfg.max_connection_age)
            .max_connection_age_grace(cfg.max_connection_age_grace);
    }
    let guard = Arc::new(rpc_guard::GuardState {
        auth: auth::AgentAuth::new(gw.tokens.clone(), gw.metrics.clone()),
        backends: gw.backends.clone(),
        metrics: gw.metrics.clone(),
        max_refused_calls: cfg.max_refused_calls_before_auth,
        max_unauthenticated_calls: cfg.max_unauthenticated_calls_per_connection,
    });
    let tunnels = tunnel::TunnelService {
        parking: gw.tunnels.parking.clone(),
        metrics: gw.metrics.clone(),
        descriptor_timeout: cfg.tunnel_descriptor_timeout,
    };
    // RpcObserve outside StatusInTrailers: the metric and the log line record the status the
    // client gets, after tonic's codec errors were given their code (`codec_error_text`).
    let server = builder
        .layer(rpc_layer::RpcObserveLayer {
            metrics: gw.metrics.clone(),
            backends: gw.backends.clone(),
        })
        .layer(status_in_trailers::StatusInTrailersLayer)
        .layer(rpc_guard::RpcGuardLayer { state: guard })
        .layer(backends::route::BackendRouteLayer {
            backends: gw.backends.clone(),
            metrics: gw.metrics.clone(),
            directory: gw.directory.clone(),
        })
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            AgentSessionServer::new(session::SessionService {
                sessions: gw.sessions.clone(),
            })
            .accept_compressed(gzip)
            .max_decoding_message_size(cfg.max_message_size_session),
        )
        .add_service(
            TunnelServer::new(tunnels)
                .accept_compressed(gzip)
                .max_decoding_message_size(cfg.max_message_size_tunnel),
        )
        .serve_with_incoming_shutdown(incoming, server_stop.cancelled_owned());
    Ok(tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!("the agent port stopped serving: {e}");
        }
    }))
}
