//! Invite codes: short codes a person can read out or type,
//! `OAGI-XXXX-XXXX-XXXX`, that a new node redeems over the network for the
//! network's genesis.
//!
//! Eleven symbols of Crockford's base 32 carry 55 random bits; the
//! twelfth is Crockford's check symbol (the value mod 37), which catches
//! any single mistyped symbol and any two adjacent symbols swapped.
//! Reading is forgiving the way Crockford's alphabet intends: case,
//! dashes and spaces do not matter, `O` reads as `0`, `I` and `L` as `1`.
//!
//! The inviter keeps only a hash of each code. Guessing: 2^55 codes, and
//! a node answers at most [`REDEEM_ATTEMPTS_PER_MINUTE`] redemptions a
//! minute in all, so even a code alive for a week is guessed with
//! probability below 10^-10.

/// Crockford's base-32 alphabet.
const SYMBOLS: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// The check symbols (values 0 to 36).
const CHECK_SYMBOLS: &[u8; 37] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ*~$=U";
/// Random symbols per code.
const DATA_SYMBOLS: usize = 11;
/// Redemptions a node answers a minute, from all peers together.
pub const REDEEM_ATTEMPTS_PER_MINUTE: usize = 30;

/// Why a typed code is not a code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    /// Wrong length or a symbol outside the alphabet.
    #[error(
        "not an invite code: expected OAGI- and 12 letters or digits (like OAGI-7K2M-Q9XD-4TPR)"
    )]
    Malformed,
    /// The check symbol does not match: a symbol was mistyped.
    #[error("the code has a typo: its check symbol does not match (read it again)")]
    Mistyped,
}

fn value_of(symbol: u8) -> Option<u64> {
    let symbol = match symbol.to_ascii_uppercase() {
        b'O' => b'0',
        b'I' | b'L' => b'1',
        other => other,
    };
    SYMBOLS.iter().position(|&s| s == symbol).map(|v| v as u64)
}

/// A new code from 55 random bits.
pub fn generate() -> Result<String, openagi_crypto::Error> {
    let mut bytes = [0u8; 8];
    openagi_crypto::os_random(&mut bytes)?;
    let number = u64::from_le_bytes(bytes) >> 9;
    Ok(format_code(number))
}

fn format_code(number: u64) -> String {
    let mut symbols = Vec::with_capacity(DATA_SYMBOLS + 1);
    for i in (0..DATA_SYMBOLS).rev() {
        symbols.push(SYMBOLS[((number >> (5 * i)) & 31) as usize]);
    }
    symbols.push(CHECK_SYMBOLS[(number % 37) as usize]);
    let text = String::from_utf8_lossy(&symbols).into_owned();
    format!("OAGI-{}-{}-{}", &text[0..4], &text[4..8], &text[8..12])
}

/// Reads a typed code back to its canonical form (`OAGI-XXXX-XXXX-XXXX`),
/// checking its check symbol.
pub fn normalize(typed: &str) -> Result<String, CodeError> {
    let compact: Vec<u8> = typed
        .bytes()
        .filter(|b| !matches!(b, b'-' | b' ' | b'\t'))
        .map(|b| b.to_ascii_uppercase())
        .collect();
    let body = compact.strip_prefix(b"OAGI").unwrap_or(&compact);
    if body.len() != DATA_SYMBOLS + 1 {
        return Err(CodeError::Malformed);
    }
    let mut number = 0u64;
    for &symbol in &body[..DATA_SYMBOLS] {
        number = (number << 5) | value_of(symbol).ok_or(CodeError::Malformed)?;
    }
    let check_symbol = match body[DATA_SYMBOLS] {
        b'O' => b'0',
        b'I' | b'L' => b'1',
        other => other,
    };
    let check = CHECK_SYMBOLS
        .iter()
        .position(|&s| s == check_symbol)
        .ok_or(CodeError::Malformed)? as u64;
    if check != number % 37 {
        return Err(CodeError::Mistyped);
    }
    Ok(format_code(number))
}

/// The prefix of an invite's long form.
pub const LONG_PREFIX: &str = "OAGI1:";

/// Everything a joiner needs in one token: the code, the network id, the
/// hash of the network's genesis (checked against what the inviter
/// sends) and where to reach the inviter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LongInvite {
    /// The short code.
    pub code: String,
    /// The network id.
    pub network_id: String,
    /// BLAKE3 of the network's `genesis.toml` (hex).
    pub genesis_hash: String,
    /// The inviter's addresses, each ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<String>,
}

impl LongInvite {
    /// `OAGI1:` and the URL-safe base 64 of its JSON.
    pub fn encode(&self) -> String {
        use base64::Engine;
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!(
            "{LONG_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }

    /// Reads a long form back (its code checked too).
    pub fn decode(text: &str) -> Result<Self, CodeError> {
        use base64::Engine;
        let body = text
            .trim()
            .strip_prefix(LONG_PREFIX)
            .ok_or(CodeError::Malformed)?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| CodeError::Malformed)?;
        let mut invite: LongInvite =
            serde_json::from_slice(&json).map_err(|_| CodeError::Malformed)?;
        invite.code = normalize(&invite.code)?;
        Ok(invite)
    }
}

/// The hash of a `genesis.toml` a long invite carries.
pub fn genesis_hash(genesis_toml: &str) -> String {
    blake3::hash(genesis_toml.as_bytes()).to_hex().to_string()
}

/// What the inviter stores of a code: its hash (the code itself is never
/// kept).
pub fn code_hash(canonical: &str) -> [u8; 32] {
    *blake3::Hasher::new_derive_key("openagi/invite/v1")
        .update(canonical.as_bytes())
        .finalize()
        .as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_typos_are_caught() {
        for _ in 0..200 {
            let code = generate().expect("randomness");
            assert_eq!(code.len(), 19, "{code}");
            assert_eq!(normalize(&code), Ok(code.clone()));
            assert_eq!(
                normalize(&code.to_lowercase().replace('-', " ")),
                Ok(code.clone())
            );
            let symbols: Vec<char> = code.chars().collect();
            // Every single substitution among the data symbols is caught.
            for i in 5..18 {
                if symbols[i] == '-' {
                    continue;
                }
                for &s in SYMBOLS.iter() {
                    let s = s as char;
                    if s == symbols[i] {
                        continue;
                    }
                    let mut typo = symbols.clone();
                    typo[i] = s;
                    let typo: String = typo.into_iter().collect();
                    assert!(normalize(&typo).is_err(), "{typo} was taken for {code}");
                }
            }
        }
        assert_eq!(normalize("OAGI-1234"), Err(CodeError::Malformed));
        assert_eq!(normalize("OAGI-!!!!-!!!!-!!!!"), Err(CodeError::Malformed));
    }

    #[test]
    fn the_long_form_round_trips_and_checks_its_code() {
        let invite = LongInvite {
            code: generate().expect("code"),
            network_id: "mynet".into(),
            genesis_hash: genesis_hash("network_id = \"mynet\""),
            bootstrap: vec!["/ip4/192.0.2.1/tcp/4610/p2p/12D3KooWabc".into()],
        };
        let text = invite.encode();
        assert!(text.starts_with(LONG_PREFIX));
        assert_eq!(LongInvite::decode(&text), Ok(invite.clone()));
        assert_eq!(LongInvite::decode("OAGI1:!!"), Err(CodeError::Malformed));
        let mut typo = invite;
        typo.code.replace_range(
            5..6,
            if typo.code.as_bytes()[5] == b'X' {
                "Y"
            } else {
                "X"
            },
        );
        assert_eq!(LongInvite::decode(&typo.encode()), Err(CodeError::Mistyped));
    }

    #[test]
    fn crockford_readings_are_forgiven() {
        let code = format_code(0);
        assert_eq!(code, "OAGI-0000-0000-0000");
        assert_eq!(normalize("oagi-oooo-oooo-oooo"), Ok(code));
        let ones = format_code(0b00001_00001_00001_00001_00001_00001_00001_00001_00001_00001_00001);
        assert_eq!(normalize(&ones.replace('1', "l")), Ok(ones.clone()));
        assert_eq!(normalize(&ones.replace('1', "I")), Ok(ones));
    }
}
