//! The payload codec: the only place that knows the payload is bincode.
//!
//! bincode 2.0.1 is pinned (`=2.0.1`); RUSTSEC-2025-0141 marks the crate unmaintained. Keeping
//! every use of it here means a successor codec arrives as a new envelope format version with
//! a new module beside this one, and old envelopes keep decoding through this one.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::Error;

/// Largest payload bincode may claim while decoding; guards allocation by hostile length
/// prefixes. Callers apply their own, usually smaller, limit on top.
const DECODE_BYTES_MAX: usize = 256 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_BYTES_MAX>()
}

/// Encodes `value` to bytes. Deterministic: equal values give equal bytes.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| Error::Payload(e.to_string()))
}

/// Decodes exactly `bytes` as a `T`; trailing bytes are an error.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let (value, read) = bincode::serde::decode_from_slice::<T, _>(bytes, config())
        .map_err(|e| Error::Payload(e.to_string()))?;
    if read != bytes.len() {
        return Err(Error::Payload(format!(
            "{} bytes left after the value",
            bytes.len() - read
        )));
    }
    Ok(value)
}
