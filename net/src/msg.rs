//! `/openagi/msg/1`: end-to-end encrypted messages between two nodes.
//!
//! One request, one response, each an opaque byte string bounded here:
//! the node encodes fetching a peer's one-time key bundle and delivering a
//! Double Ratchet message in them. This layer never sees plaintext; it
//! only carries bytes and matches responses to requests, so the node can
//! answer an inbound request after consulting its ratchet state.

use std::io;

use futures::prelude::*;
use libp2p::StreamProtocol;
use libp2p::request_response::Codec;

use crate::direct::read_bounded;

/// The protocol name.
pub const MSG_PROTOCOL: StreamProtocol = StreamProtocol::new("/openagi/msg/1");

/// Largest request accepted: a ratchet message carrying the largest text a
/// node sends, with room for framing and the sender's signed key.
pub const MAX_MSG_REQUEST_BYTES: usize = 64 * 1024;

/// Largest response accepted: a signed key bundle or an acknowledgement.
pub const MAX_MSG_RESPONSE_BYTES: usize = 4 * 1024;

/// Reads and writes byte messages delimited by the end of the stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct MsgCodec;

impl Codec for MsgCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_bounded(io, MAX_MSG_REQUEST_BYTES).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_bounded(io, MAX_MSG_RESPONSE_BYTES).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&res).await?;
        io.close().await
    }
}
