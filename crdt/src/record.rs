//! Records: small serde values that geostate keeps in stores beside CRDT values (conflict
//! records, replication metadata). A record is one format-version byte followed by the
//! payload codec's encoding, so the codec stays confined to one module and can change with a
//! version bump, like the envelope's.
//!
//! ```
//! use geostate_crdt::record;
//! let bytes = record::encode(&("key", 7u64)).unwrap();
//! assert_eq!(bytes[0], 1);
//! let back: (String, u64) = record::decode(&bytes).unwrap();
//! assert_eq!(back, ("key".to_string(), 7));
//! assert!(record::decode::<(String, u64)>(&bytes[..2]).is_err());
//! ```

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{self, RECORD_FORMAT_VERSION};
use crate::Error;

/// Encodes a record.
pub fn encode<T: Serialize>(record: &T) -> Result<Vec<u8>, Error> {
    let payload = codec::encode(record)?;
    let mut out = Vec::with_capacity(payload.len() + 1);
    out.push(RECORD_FORMAT_VERSION);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a record; unknown versions, truncation and trailing bytes are typed errors.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    match bytes.split_first() {
        None => Err(Error::Truncated {
            needed: 1,
            available: 0,
        }),
        Some((&RECORD_FORMAT_VERSION, payload)) => codec::decode(payload),
        Some((&version, _)) => Err(Error::UnknownVersion(version)),
    }
}
