//! Patch 7 of our h2 (third_party/h2/AGENTGATE-PATCHES.md), over a real h2 client and server
//! on an in-memory pipe. Capacity that a stream's producer reserves for itself must not wake
//! it: hyper reserves capacity for every body chunk, and in tokio's multi-thread runtime a
//! task woken from inside its own poll is rescheduled through another worker (a futex call
//! and a context switch per message). Capacity that the peer grants later, with a
//! WINDOW_UPDATE, must still wake it.

use std::future::poll_fn;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;

/// Counts its wake-ups.
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// h2's initial stream and connection window.
const WINDOW: usize = 65_535;

#[tokio::test]
async fn capacity_the_producer_reserves_does_not_wake_it_and_a_window_update_does() {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let (got_all_tx, got_all) = tokio::sync::oneshot::channel::<()>();
    let (release, release_rx) = tokio::sync::oneshot::channel::<()>();
    // The client reads the whole first window and hands it back only when told to.
    let client = tokio::spawn(async move {
        let (mut send, conn) = h2::client::handshake(client_io).await.expect("handshake");
        tokio::spawn(conn);
        let request = http::Request::get("http://test/")
            .body(())
            .expect("request");
        let (response, _) = send.send_request(request, true).expect("send request");
        let mut body = response.await.expect("response").into_body();
        let mut got = 0;
        while got < WINDOW {
            got += body.data().await.expect("data").expect("a chunk").len();
        }
        got_all_tx.send(()).expect("the test waits");
        release_rx.await.expect("the test says when");
        body.flow_control().release_capacity(got).expect("release");
        // Keep the stream open until the test is done with it.
        let _ = body.data().await;
    });

    let mut conn = h2::server::handshake(server_io).await.expect("handshake");
    let (_request, mut respond) = conn.accept().await.expect("a request").expect("ok");
    let mut stream = respond
        .send_response(http::Response::new(()), false)
        .expect("response head");
    tokio::spawn(async move { while conn.accept().await.is_some() {} });

    let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
    let waker = Waker::from(counter.clone());
    let mut cx = Context::from_waker(&waker);
    // Registered as the stream's producer, as hyper does before each chunk.
    assert!(stream.poll_reset(&mut cx).is_pending());

    stream.reserve_capacity(1000);
    assert_eq!(
        stream.capacity(),
        1000,
        "the window had room: assigned at once"
    );
    stream.reserve_capacity(WINDOW);
    assert_eq!(stream.capacity(), WINDOW);
    stream
        .send_data(Bytes::from(vec![7u8; WINDOW]), false)
        .expect("send");
    assert_eq!(
        counter.0.load(Ordering::SeqCst),
        0,
        "reserving and sending woke the producer that made the calls"
    );

    // The window is spent; more capacity comes only with the client's WINDOW_UPDATE.
    got_all.await.expect("the client read the window");
    stream.reserve_capacity(10);
    while let Poll::Ready(Some(Ok(_))) = stream.poll_capacity(&mut cx) {}
    assert_eq!(stream.capacity(), 0);
    let before = counter.0.load(Ordering::SeqCst);
    release.send(()).expect("the client waits");
    tokio::time::timeout(Duration::from_secs(10), async {
        while counter.0.load(Ordering::SeqCst) == before {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the WINDOW_UPDATE woke the waiting producer");
    let granted = poll_fn(|cx| stream.poll_capacity(cx))
        .await
        .expect("capacity")
        .expect("no error");
    assert_eq!(granted, 10);
    client.abort();
}
