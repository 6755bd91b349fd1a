//! Bundles: the encoded messages one processing round sends to one peer,
//! framed into as few transport messages as fit the transport's size
//! limit. A bundle is a version byte, then each message as a 4-byte
//! little-endian length and its bytes ([`Message::encode`] output).
//!
//! Over Tor a stream costs round trips, and one stream per message piled
//! up thousands of streams and hit the connection's stream limits; one
//! bundle per peer per round does not.
//!
//! [`Message::encode`]: crate::Message::encode

use std::sync::Arc;

/// Version byte of a bundle.
pub const VERSION: u8 = 1;

/// Bytes of framing per message (a little-endian length).
pub const FRAME: usize = 4;

/// Packs `parts` into bundles of at most `max_bytes` each (a part larger
/// than that travels alone, and the transport refuses it).
pub fn pack(parts: &[Arc<Vec<u8>>], max_bytes: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut current = vec![VERSION];
    for part in parts {
        let framed = FRAME + part.len();
        if current.len() > 1 && current.len() + framed > max_bytes {
            out.push(std::mem::replace(&mut current, vec![VERSION]));
        }
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        current.extend_from_slice(&len.to_le_bytes());
        current.extend_from_slice(part);
    }
    if current.len() > 1 {
        out.push(current);
    }
    out
}

/// Splits a bundle back into its messages, refusing bad framing.
pub fn decode(data: &[u8]) -> Result<Vec<&[u8]>, String> {
    let Some((&version, mut rest)) = data.split_first() else {
        return Err("empty bundle".into());
    };
    if version != VERSION {
        return Err(format!("unknown bundle version {version}"));
    }
    let mut parts = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<FRAME>()
            .ok_or("truncated length")?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > tail.len() {
            return Err(format!("message of {len} bytes in {} left", tail.len()));
        }
        let (part, tail) = tail.split_at(len);
        parts.push(part);
        rest = tail;
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_round_trip_split_at_the_limit_and_refuse_bad_framing() {
        const LIMIT: usize = 16 * 1024 * 1024;
        let parts: Vec<Arc<Vec<u8>>> = vec![
            Arc::new(b"prepare".to_vec()),
            Arc::new(Vec::new()),
            Arc::new(vec![7u8; 1000]),
        ];
        let packed = pack(&parts, LIMIT);
        assert_eq!(packed.len(), 1);
        let back = decode(&packed[0]).expect("decodes");
        assert_eq!(back, [&b"prepare"[..], &[][..], &[7u8; 1000][..]]);
        assert!(pack(&[], LIMIT).is_empty());

        // Two messages that do not fit one transport message go in two.
        let half = LIMIT / 2 + 1;
        let big = vec![Arc::new(vec![1u8; half]), Arc::new(vec![2u8; half])];
        let packed = pack(&big, LIMIT);
        assert_eq!(packed.len(), 2);
        assert!(packed.iter().all(|b| b.len() <= LIMIT));

        assert!(decode(&[]).is_err());
        assert!(decode(&[9, 0, 0, 0, 0]).is_err(), "unknown version");
        assert!(decode(&[VERSION, 1, 0]).is_err(), "short length");
        assert!(
            decode(&[VERSION, 5, 0, 0, 0, 1]).is_err(),
            "length past the end"
        );
    }
}
