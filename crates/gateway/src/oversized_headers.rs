//! Requests refused for the size of their header list. h2 answers them itself (our patch 8:
//! RESOURCE_EXHAUSTED with a sentence for gRPC, 431 otherwise) before any service sees the
//! request, so without this nothing counted or logged them.
//!
//! h2 calls a plain function (`h2::ext::on_oversized_request_headers`) that knows nothing of
//! the listener or the peer, hence the process-wide counts, read at each scrape.

use std::sync::atomic::{AtomicU64, Ordering};

use agentgate_proto::exposition::{Kind, Scrape};
use agentgate_transport::PRE_AUTH_LOG;

/// Refused gRPC requests (answered RESOURCE_EXHAUSTED) and others (answered 431).
static GRPC: AtomicU64 = AtomicU64::new(0);
static OTHER: AtomicU64 = AtomicU64::new(0);

/// Makes h2 report each refusal here. Idempotent.
pub fn install() {
    h2::ext::on_oversized_request_headers(refused);
}

fn refused(grpc: bool) {
    let (count, answer) = if grpc {
        (&GRPC, "RESOURCE_EXHAUSTED")
    } else {
        (&OTHER, "HTTP 431")
    };
    count.fetch_add(1, Ordering::Relaxed);
    // Anyone can send one: the line comes out of the budget for unauthenticated input.
    if let Some(suppressed) = PRE_AUTH_LOG.allow() {
        tracing::warn!(
            answer,
            suppressed,
            "refused a request whose headers (metadata) are larger than the listener accepts; \
             the caller was answered {answer} and must send less metadata"
        );
    }
}

/// Adds `agentgate_oversized_request_headers_total` to a scrape.
pub fn add_to(scrape: &mut Scrape) {
    let family = scrape.family(
        "agentgate_oversized_request_headers_total",
        "Requests on any of the gateway's HTTP/2 listeners refused because their header list \
         was over the listener's limit, by answer (gRPC RESOURCE_EXHAUSTED or HTTP 431).",
        Kind::Counter,
    );
    for (answer, count) in [("resource_exhausted", &GRPC), ("http_431", &OTHER)] {
        family.number(
            vec![("answer", answer.to_string())],
            count.load(Ordering::Relaxed) as f64,
        );
    }
}
