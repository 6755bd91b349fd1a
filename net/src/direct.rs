//! `/openagi/direct/1`: opaque messages sent straight to one peer.
//!
//! Consensus traffic goes to the validators that need it, not flooded over
//! gossip: each message is one request on a fresh stream, answered with an
//! empty acknowledgement. The payload is whatever the caller encoded (the
//! node puts PBFT messages here); this layer only bounds its size.

use std::io;

use futures::prelude::*;
use libp2p::StreamProtocol;
use libp2p::request_response::Codec;

/// The protocol name.
pub const DIRECT_PROTOCOL: StreamProtocol = StreamProtocol::new("/openagi/direct/1");

/// Largest direct message accepted, in bytes. A PBFT pre-prepare carries a
/// whole batch, and a state-transfer reply several blocks.
pub const MAX_DIRECT_BYTES: usize = 16 * 1024 * 1024;

/// Reads and writes length-delimited-by-stream-end byte messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectCodec;

/// Reads a whole stream of at most `limit` bytes.
pub(crate) async fn read_bounded<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: usize,
) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    // Read one byte past the limit so an oversized message is detected
    // without buffering all of it.
    io.take(limit as u64 + 1).read_to_end(&mut buf).await?;
    if buf.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message exceeds {limit} bytes"),
        ));
    }
    Ok(buf)
}

/// Writes one message and closes the write side: the end of the stream
/// delimits it, which [`read_bounded`] relies on.
pub(crate) async fn write_and_close<T>(io: &mut T, bytes: &[u8]) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
{
    io.write_all(bytes).await?;
    io.close().await
}

impl Codec for DirectCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = ();

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_bounded(io, MAX_DIRECT_BYTES).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<()>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_bounded(io, 0).await.map(|_| ())
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

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, _: ()) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_messages_are_errors_and_small_ones_pass() {
        futures::executor::block_on(async {
            let mut ok = futures::io::Cursor::new(vec![7u8; 10]);
            assert_eq!(
                read_bounded(&mut ok, 10).await.expect("fits"),
                vec![7u8; 10]
            );
            let mut big = futures::io::Cursor::new(vec![7u8; 11]);
            assert!(read_bounded(&mut big, 10).await.is_err());
        });
    }
}
