//! Request-response protocols whose bytes the node interprets:
//! `/openagi/msg/1` (end-to-end encrypted messages: one-time key bundles
//! and Double Ratchet messages) and `/openagi/learn/1` (federated learning:
//! model chunks and client updates).
//!
//! One request, one response, each an opaque byte string bounded by the
//! protocol's [`MsgCodec`] limits. This layer never interprets them; it
//! only carries bytes and matches responses to requests, so the node can
//! answer an inbound request after consulting its own state.

use std::io;

use futures::prelude::*;
use libp2p::StreamProtocol;
use libp2p::request_response::Codec;

use crate::bounded::{read_bounded, write_and_close};

/// The messaging protocol's name.
pub const MSG_PROTOCOL: StreamProtocol = StreamProtocol::new("/openagi/msg/1");
/// The learning protocol's name.
pub const LEARN_PROTOCOL: StreamProtocol = StreamProtocol::new("/openagi/learn/1");
/// Committed blocks for nodes following the ledger, and transactions a
/// full node forwards to a validator.
pub const LEDGER_PROTOCOL: StreamProtocol = StreamProtocol::new("/openagi/ledger/1");

/// Largest request accepted: a ratchet message carrying the largest text a
/// node sends, with room for framing and the sender's signed key.
pub const MAX_MSG_REQUEST_BYTES: usize = 64 * 1024;

/// Largest response accepted: a signed key bundle or an acknowledgement.
pub const MAX_MSG_RESPONSE_BYTES: usize = 4 * 1024;

/// Largest learning request: a client update of a model of up to 4 M
/// parameters sent dense (the largest architecture a job may use is
/// bounded by this too), with framing.
pub const MAX_LEARN_REQUEST_BYTES: usize = 16 * 1024 * 1024 + 4096;

/// Largest learning response: one model chunk with framing.
pub const MAX_LEARN_RESPONSE_BYTES: usize = 1024 * 1024 + 4096;

/// Largest ledger request: a forwarded transaction (64 KiB) and framing.
pub const MAX_LEDGER_REQUEST_BYTES: usize = 64 * 1024 + 1024;

/// Largest ledger answer: a run of blocks with their certificates; the
/// node answering stops adding blocks before this.
pub const MAX_LEDGER_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// Reads and writes byte messages delimited by the end of the stream,
/// refusing any longer than the protocol's limits.
#[derive(Debug, Clone, Copy)]
pub struct MsgCodec {
    max_request: usize,
    max_response: usize,
}

impl MsgCodec {
    /// The limits of `/openagi/msg/1`.
    pub fn msg() -> Self {
        Self {
            max_request: MAX_MSG_REQUEST_BYTES,
            max_response: MAX_MSG_RESPONSE_BYTES,
        }
    }

    /// The limits of `/openagi/ledger/1`.
    pub fn ledger() -> Self {
        Self {
            max_request: MAX_LEDGER_REQUEST_BYTES,
            max_response: MAX_LEDGER_RESPONSE_BYTES,
        }
    }

    /// The limits of `/openagi/learn/1`.
    pub fn learn() -> Self {
        Self {
            max_request: MAX_LEARN_REQUEST_BYTES,
            max_response: MAX_LEARN_RESPONSE_BYTES,
        }
    }
}

impl Codec for MsgCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_bounded(io, self.max_request).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_bounded(io, self.max_response).await
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
        write_and_close(io, &req).await
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
        write_and_close(io, &res).await
    }
}
