//! The protobuf codec of the gRPC service: tonic-prost's encoder and decoder
//! with small buffers.
//!
//! tonic allocates each stream's encode and decode buffers up front, 8 KiB
//! each by default: 16 KiB of every idle stream, more than everything else a
//! stream holds. The seed's messages are tens of bytes; buffers of
//! [`BUFFER_SIZE`] grow on demand for larger ones (up to the message limit),
//! so nothing is refused, only idle memory is saved.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial size of a stream's encode and decode buffers.
pub const BUFFER_SIZE: usize = 1024;

/// How many encoded bytes tonic gathers before it yields them to HTTP/2
/// (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `tonic_prost::ProstCodec` with [`BUFFER_SIZE`] buffers; `build.rs` makes
/// the generated service and client use it.
#[derive(Debug)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        LeanCodec(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
