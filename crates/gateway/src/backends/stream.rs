//! One call's HTTP/2 stream to its backend, on `h2` directly.
//!
//! hyper's HTTP/2 client spawns a task per request to wait for the answer, hands requests to
//! the connection's task through a channel, and spawns another task whenever the request body
//! is not complete when the head is sent. For a unary call that is two or three task wake-ups
//! and a spawn on top of the work itself (docs/BENCHMARKS.md, "Seventeenth session"). Here the
//! call's own future sends the head, pumps the request body while it waits for the answer, and
//! reads the answer; a task of its own is spawned only for a request body that is still
//! streaming once the answer has begun (client-streaming and bidi calls).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::client::ResponseFuture;
use h2::{RecvStream, SendStream};
use http_body::{Body, Frame};
use tokio::sync::oneshot;

use super::pool::CallBody;

/// Why a call could not be sent.
pub enum SendError {
    /// The connection takes no new stream (the backend sent GOAWAY, or the connection broke)
    /// and nothing was sent: the request comes back, to be sent on another connection.
    Unusable(h2::Error, Box<http::Request<CallBody>>),
    /// The stream could not be opened.
    Refused(h2::Error),
    /// The caller's request broke before anything was sent.
    CallerGone,
}

/// A request sent, and what its sender must still do: run the pump while the body streams,
/// or else keep the copy that can send it again.
pub struct Sending {
    pub answer: ResponseFuture,
    /// Unless the body has already gone out whole: the pump that must run until it has.
    pub pump: Option<RequestPump>,
    /// When head and body went out whole (a unary or server-streaming call, as a rule): a
    /// copy, to send again if the backend did not process the call.
    pub replay: Option<Replay>,
}

/// A copy of a request that went out whole. It costs a copy of the head's header map; the
/// message itself is shared.
pub struct Replay {
    head: http::Request<()>,
    message: Option<Bytes>,
}

impl Replay {
    fn of(head: &http::Request<()>, message: Option<&Bytes>) -> Self {
        let mut copy = http::Request::new(());
        *copy.method_mut() = head.method().clone();
        *copy.uri_mut() = head.uri().clone();
        *copy.version_mut() = head.version();
        *copy.headers_mut() = head.headers().clone();
        Self {
            head: copy,
            message: message.cloned(),
        }
    }

    /// The request again, as it was first sent.
    pub fn request(self) -> http::Request<CallBody> {
        let body = match self.message {
            Some(m) => CallBody::new(http_body_util::Full::new(m)),
            None => CallBody::empty(),
        };
        let (parts, ()) = self.head.into_parts();
        http::Request::from_parts(parts, body)
    }
}

/// Whether the backend did not process the call at all, so that sending it again cannot do
/// anything twice: it refused the stream (REFUSED_STREAM, RFC 9113 section 8.7), or it went
/// away (GOAWAY) with a last stream below the call's (h2 reports a GOAWAY to such streams
/// only; the streams it processed end normally or with the broken connection).
pub fn never_processed(e: &h2::Error) -> bool {
    e.is_remote() && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// Sends the request head (and the body as far as it has arrived).
///
/// A unary call's message has usually arrived with its head. It is taken first, so that the
/// head and the message are queued together: sent apart, the connection's task (often on the
/// other worker) writes the head alone, and the backend wakes twice for one call.
pub async fn send(
    sender: &mut h2::client::SendRequest<Bytes>,
    request: http::Request<CallBody>,
) -> Result<Sending, SendError> {
    let ready = std::future::poll_fn(|cx| match sender.poll_ready(cx) {
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        // Pending only for a handle with a stream waiting to open; each call has its own.
        _ => Poll::Ready(Ok(())),
    })
    .await;
    if let Err(e) = ready {
        return Err(SendError::Unusable(e, Box::new(request)));
    }
    let (parts, mut body) = request.into_parts();
    let head = http::Request::from_parts(parts, ());
    let first = if body.is_end_stream() {
        Some(None)
    } else {
        std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    };
    let first = match first {
        Some(Some(Err(_))) => return Err(SendError::CallerGone),
        Some(Some(Ok(frame))) => Some(frame),
        // The body is already over: the head carries END_STREAM.
        Some(None) => {
            let replay = Some(Replay::of(&head, None));
            let (answer, _) = sender
                .send_request(head, true)
                .map_err(SendError::Refused)?;
            return Ok(Sending {
                answer,
                pump: None,
                replay,
            });
        }
        None => None,
    };
    let replay = match first.as_ref().map(Frame::data_ref) {
        Some(Some(message)) if body.is_end_stream() => Some(Replay::of(&head, Some(message))),
        _ => None,
    };
    let (answer, mut stream) = sender
        .send_request(head, false)
        .map_err(SendError::Refused)?;
    if let Some(frame) = first {
        // Errors here mean the stream is already gone; the answer's future reports why.
        let done = match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                let _ = stream.send_data(data, end);
                end
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    if stream.send_trailers(trailers).is_err() {
                        stream.send_reset(h2::Reason::CANCEL);
                    }
                }
                true
            }
        };
        if done {
            return Ok(Sending {
                answer,
                pump: None,
                replay,
            });
        }
    }
    let pump = RequestPump {
        body,
        stream,
        stop: None,
    };
    Ok(Sending {
        answer,
        pump: Some(pump),
        replay: None,
    })
}

/// Waits for the answer's head, running the pump meanwhile; the pump comes back if the body
/// still streams (then it needs a task of its own: [`RequestPump::spawn`]).
pub async fn answer_head(
    answer: ResponseFuture,
    mut pump: Option<RequestPump>,
) -> Result<(http::Response<RecvStream>, Option<RequestPump>), h2::Error> {
    let mut answer = std::pin::pin!(answer);
    let head = std::future::poll_fn(|cx| {
        if let Some(p) = pump.as_mut() {
            if Pin::new(p).poll(cx).is_ready() {
                pump = None;
            }
        }
        answer.as_mut().poll(cx)
    })
    .await?;
    Ok((head, pump))
}

/// Copies the caller's request body into the backend's stream, within the backend's flow
/// control window. Ends when the body ends, when either side resets the stream, or when the
/// call's answer is dropped (see [`RequestPump::stop_with`]).
pub struct RequestPump {
    body: CallBody,
    stream: SendStream<Bytes>,
    stop: Option<oneshot::Receiver<()>>,
}

impl RequestPump {
    /// Runs the rest of the pump on a task of its own, until the body has gone out or the
    /// returned handle is dropped (then the stream is reset). The call's answer holds the
    /// handle, so a call that the caller or the gateway ended stops sending to the backend
    /// even while the caller's body is still open.
    pub fn spawn(mut self) -> StopPumpOnDrop {
        let (tx, rx) = oneshot::channel();
        self.stop = Some(rx);
        tokio::spawn(self);
        StopPumpOnDrop { _stop: tx }
    }
}

/// Stops a spawned [`RequestPump`] when dropped.
pub struct StopPumpOnDrop {
    _stop: oneshot::Sender<()>,
}

impl Future for RequestPump {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if let Some(stop) = this.stop.as_mut() {
            if Pin::new(stop).poll(cx).is_ready() {
                this.stream.send_reset(h2::Reason::CANCEL);
                return Poll::Ready(());
            }
        }
        loop {
            // The backend may reset the stream (it answered and needs no more, or refused
            // the call); nothing more is sent then.
            if this.stream.poll_reset(cx).is_ready() {
                return Poll::Ready(());
            }
            // Wait for room in the backend's window before taking the next frame: h2
            // buffers a frame larger than the room, so one frame at a time bounds the
            // buffer per call.
            this.stream.reserve_capacity(1);
            if this.stream.capacity() == 0 {
                match this.stream.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(_))) => continue,
                    Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
            let sent = match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.stream.send_data(Bytes::new(), true),
                Poll::Ready(Some(Err(_))) => {
                    // The caller's side broke (reset, or its connection ended).
                    this.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let end = this.body.is_end_stream();
                        let sent = this.stream.send_data(data, end);
                        if sent.is_ok() && !end {
                            continue;
                        }
                        sent
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            let sent = this.stream.send_trailers(trailers);
                            if sent.is_err() {
                                // The stream must not stay open without its end.
                                this.stream.send_reset(h2::Reason::CANCEL);
                            }
                            sent
                        }
                        Err(_) => continue,
                    },
                },
            };
            // The last frame went out, or the stream is gone: either way the pump is done.
            let _ = sent;
            return Poll::Ready(());
        }
    }
}

/// The next frame of the backend's answer. Data is released from the flow-control window as
/// it is handed on, so the backend sends as fast as the caller reads.
pub fn poll_answer_frame(
    stream: &mut RecvStream,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
    match stream.poll_data(cx) {
        Poll::Ready(Some(Ok(data))) => {
            // Releasing can fail only for a stream already reset, which the next poll reports.
            let _ = stream.flow_control().release_capacity(data.len());
            Poll::Ready(Some(Ok(Frame::data(data))))
        }
        Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
        Poll::Ready(None) => match stream.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        },
        Poll::Pending => Poll::Pending,
    }
}

/// What went wrong on a backend stream or connection, for a caller: the reset code, or that
/// the connection broke. Never h2's own text, which can carry the backend's GOAWAY debug data.
pub fn describe(e: &h2::Error) -> String {
    match e.reason() {
        Some(r) if e.is_go_away() && e.is_remote() => format!("it closed the connection ({r})"),
        // h2 gave the connection up itself (the backend broke HTTP/2's rules on it).
        Some(r) if e.is_go_away() => format!("its connection broke HTTP/2's rules ({r})"),
        Some(r) if e.is_remote() => format!("it reset the call ({r})"),
        Some(r) => format!("the call was reset ({r})"),
        None if e.is_io() => "the connection to it broke".to_string(),
        None => "an HTTP/2 error".to_string(),
    }
}
