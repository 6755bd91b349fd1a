//! Byte-string messages delimited by the end of their stream: what the
//! direct protocol and the msg and learn codecs read and write.

use std::io;

use futures::prelude::*;

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
