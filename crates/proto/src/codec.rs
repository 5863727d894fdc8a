//! The protobuf codec for agentgate's services, with small initial buffers.
//!
//! tonic's default codec starts every stream with an 8 KiB encode buffer and an 8 KiB decode
//! buffer. An idle agent holds three long-lived streams (its session and two parked tunnels),
//! so on the gateway that is 48 KiB per agent spent on buffers that carry a heartbeat every
//! 20 s. Starting at 64 bytes (a heartbeat fits) keeps idle agents cheap; the buffers grow to
//! fit big messages (body chunks) on the streams that carry them. 512 bytes cost 2.2 KiB more
//! per idle agent than 64 (DHAT, 300 idle agents, seventh session; docs/BENCHMARKS.md).

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial encode and decode buffer per stream. Not zero: tonic divides by it to size the
/// buffers of compressed messages.
pub const INITIAL_BUFFER: usize = 64;
/// Encoded bytes after which a streaming response yields to the transport (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
