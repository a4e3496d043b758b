//! The storage envelope: the bytes a store holds for one value, and a change feed for one delta.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "GSTE"
//! 4       1     format version (1)
//! 5       1     type tag (see TypeTag)
//! 6       1     flags: bit 0 zstd-compressed payload, bit 1 encrypted (reserved)
//! 7       4     payload length in bytes, little-endian u32 (as stored, after compression)
//! 11      n     payload: the value's canonical encoding (bincode 2, standard config)
//! 11+n    4     CRC-32C of bytes 0..11+n, little-endian
//! ```
//!
//! The checksum covers the header too, so a flipped bit anywhere (CRC-32C detects every
//! single-bit error) is reported, and a corrupt value is never mistaken for an empty one.
//! Decoding checks, in order: length, magic, version, declared length, checksum, type tag,
//! flags, decompression (bounded), payload, and finally the value's structural invariants.
//!
//! ```
//! use geostate_crdt::{envelope, ActorId, Crdt, Error, PnCounter, TypeTag};
//! let mut c = PnCounter::new();
//! c.merge(&c.inc(ActorId::new(1), 7).unwrap());
//! let bytes = envelope::encode(&Crdt::from(c), &envelope::Options::default()).unwrap();
//! assert_eq!(envelope::peek_type(&bytes).unwrap(), TypeTag::PnCounter);
//! let limits = envelope::Limits::default();
//! assert!(matches!(
//!     envelope::decode_as(&bytes, TypeTag::OrSet, &limits),
//!     Err(Error::TypeMismatch { .. })
//! ));
//! assert!(matches!(envelope::decode(&bytes[..5], &limits), Err(Error::Truncated { .. })));
//! ```

use crate::map::MapStore;
use crate::TypeTag;
use crate::{codec, Crdt, Error, GCounter, LwwRegister, MvRegister, OrMap, OrSet, PnCounter};

/// The four bytes every envelope starts with.
pub const MAGIC: [u8; 4] = *b"GSTE";
/// The format version this build writes.
pub const FORMAT_VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 11;
/// Bytes after the payload.
pub const TRAILER_LEN: usize = 4;
/// Flag bit: the payload is zstd-compressed.
pub const FLAG_COMPRESSED: u8 = 0b0000_0001;
/// Flag bit: the payload is encrypted (reserved; this build neither writes nor reads it).
pub const FLAG_ENCRYPTED: u8 = 0b0000_0010;
/// Deepest nesting of maps inside a map value (a map whose entries hold no nested map has
/// nesting 0). Deeper values are refused by [`encode`] and [`decode`] alike, so every value
/// that is written can be read back, and hostile bytes cannot make decoding recurse without
/// bound.
pub const MAP_NESTING_MAX: usize = 64;

/// How to encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Payloads larger than this are zstd-compressed (kept raw when that does not shrink them).
    pub compress_threshold_bytes: usize,
    /// zstd compression level.
    pub zstd_level: i32,
    /// Largest payload (before compression) accepted for encoding.
    pub payload_bytes_max: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            compress_threshold_bytes: 4 * 1024,
            zstd_level: 3,
            payload_bytes_max: 64 * 1024 * 1024,
        }
    }
}

/// Bounds applied while decoding untrusted bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, after decompression.
    pub payload_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            payload_bytes_max: 64 * 1024 * 1024,
        }
    }
}

/// The canonical payload of `value`: the uncompressed bytes an envelope carries. Equal values
/// give equal bytes, whatever order their updates were merged in, so a hash of these bytes
/// identifies a state across regions (digests use it).
pub fn canonical_payload(value: &Crdt) -> Result<Vec<u8>, Error> {
    match value {
        Crdt::GCounter(v) => codec::encode(v),
        Crdt::PnCounter(v) => codec::encode(v),
        Crdt::OrSet(v) => codec::encode(v),
        Crdt::LwwRegister(v) => codec::encode(v),
        Crdt::MvRegister(v) => codec::encode(v),
        Crdt::Map(v) => codec::encode(v),
    }
}

/// The length of [`canonical_payload`], computed without allocating it.
pub fn payload_len(value: &Crdt) -> Result<usize, Error> {
    match value {
        Crdt::GCounter(v) => codec::encoded_len(v),
        Crdt::PnCounter(v) => codec::encoded_len(v),
        Crdt::OrSet(v) => codec::encoded_len(v),
        Crdt::LwwRegister(v) => codec::encoded_len(v),
        Crdt::MvRegister(v) => codec::encoded_len(v),
        Crdt::Map(v) => codec::encoded_len(v),
    }
}

/// Encodes `value` into an envelope.
pub fn encode(value: &Crdt, options: &Options) -> Result<Vec<u8>, Error> {
    check_nesting(value)?;
    let raw = canonical_payload(value)?;
    if raw.len() > options.payload_bytes_max {
        return Err(Error::TooLarge {
            size: raw.len(),
            limit: options.payload_bytes_max,
        });
    }
    let mut flags = 0u8;
    let mut payload = raw;
    if payload.len() > options.compress_threshold_bytes {
        let compressed = zstd::bulk::compress(&payload, options.zstd_level)
            .map_err(|e| Error::Decompression(format!("compression failed: {e}")))?;
        if compressed.len() < payload.len() {
            payload = compressed;
            flags |= FLAG_COMPRESSED;
        }
    }
    let payload_len = u32::try_from(payload.len()).map_err(|_| Error::TooLarge {
        size: payload.len(),
        limit: u32::MAX as usize,
    })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(value.type_tag().as_u8());
    out.push(flags);
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// The validated header of an envelope whose checksum matched.
struct Frame<'a> {
    tag: TypeTag,
    flags: u8,
    payload: &'a [u8],
}

fn frame(bytes: &[u8]) -> Result<Frame<'_>, Error> {
    let magic_seen = bytes.len().min(MAGIC.len());
    if bytes[..magic_seen] != MAGIC[..magic_seen] {
        return Err(Error::BadMagic);
    }
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(Error::Truncated {
            needed: HEADER_LEN + TRAILER_LEN,
            available: bytes.len(),
        });
    }
    let version = bytes[4];
    if version != FORMAT_VERSION {
        return Err(Error::UnknownVersion(version));
    }
    let declared = u32::from_le_bytes([bytes[7], bytes[8], bytes[9], bytes[10]]) as usize;
    // Saturating: on a 32-bit target a declared length near u32::MAX would overflow.
    let total = declared.saturating_add(HEADER_LEN + TRAILER_LEN);
    if bytes.len() < total {
        return Err(Error::Truncated {
            needed: total,
            available: bytes.len(),
        });
    }
    if bytes.len() > total {
        return Err(Error::TrailingBytes {
            extra: bytes.len() - total,
        });
    }
    let body = &bytes[..HEADER_LEN + declared];
    let trailer = &bytes[HEADER_LEN + declared..];
    let stored = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(Error::ChecksumMismatch { stored, computed });
    }
    let tag = TypeTag::from_u8(bytes[5])?;
    let flags = bytes[6];
    if flags & !(FLAG_COMPRESSED) != 0 {
        return Err(Error::UnsupportedFlags(flags));
    }
    Ok(Frame {
        tag,
        flags,
        payload: &bytes[HEADER_LEN..HEADER_LEN + declared],
    })
}

/// The type of the value in an envelope, after checking the envelope's integrity but without
/// decoding the payload.
pub fn peek_type(bytes: &[u8]) -> Result<TypeTag, Error> {
    frame(bytes).map(|f| f.tag)
}

/// Decodes an envelope into a value. Every malformed input is a typed [`Error`].
pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Crdt, Error> {
    let frame = frame(bytes)?;
    let decompressed;
    let payload = if frame.flags & FLAG_COMPRESSED != 0 {
        decompressed = decompress(frame.payload, limits.payload_bytes_max)?;
        decompressed.as_slice()
    } else {
        frame.payload
    };
    if payload.len() > limits.payload_bytes_max {
        return Err(Error::TooLarge {
            size: payload.len(),
            limit: limits.payload_bytes_max,
        });
    }
    let value = match frame.tag {
        TypeTag::GCounter => Crdt::GCounter(codec::decode::<GCounter>(payload)?),
        TypeTag::PnCounter => Crdt::PnCounter(codec::decode::<PnCounter>(payload)?),
        TypeTag::OrSet => Crdt::OrSet(codec::decode::<OrSet<Vec<u8>>>(payload)?),
        TypeTag::LwwRegister => Crdt::LwwRegister(codec::decode::<LwwRegister<Vec<u8>>>(payload)?),
        TypeTag::MvRegister => Crdt::MvRegister(codec::decode::<MvRegister<Vec<u8>>>(payload)?),
        TypeTag::Map => Crdt::Map(codec::decode::<OrMap>(payload)?),
    };
    if !value.is_well_formed() {
        return Err(Error::Payload(format!(
            "{} state violates its invariants (non-canonical context or a live dot outside it)",
            frame.tag
        )));
    }
    check_nesting(&value)?;
    Ok(value)
}

/// Most bytes reserved up front for a decompressed payload. A frame header may claim any size
/// (up to the limit), so what lies beyond this is allocated only as it is really produced.
const RESERVE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Decompresses a zstd payload into at most `limit` bytes.
///
/// A frame whose header declares more than `limit` is refused before any work. The output
/// buffer never reserves more than the header declares (capped at [`RESERVE_BYTES_MAX`]), and
/// decompression stops one byte past `limit`, so neither a hostile header nor a huge `limit`
/// (`usize::MAX` for "no limit") makes this allocate beyond what the data really holds.
fn decompress(payload: &[u8], limit: usize) -> Result<Vec<u8>, Error> {
    use std::io::Read;

    let limit_u64 = u64::try_from(limit).unwrap_or(u64::MAX);
    let declared = zstd::zstd_safe::get_frame_content_size(payload)
        .map_err(|_| Error::Decompression("payload is not a zstd frame".to_string()))?;
    if let Some(size) = declared {
        if size > limit_u64 {
            return Err(Error::TooLarge {
                size: usize::try_from(size).unwrap_or(usize::MAX),
                limit,
            });
        }
    }
    let reserve = declared
        .and_then(|size| usize::try_from(size).ok())
        .unwrap_or(0)
        .min(RESERVE_BYTES_MAX);
    let mut out = Vec::with_capacity(reserve);
    let failed = |e: std::io::Error| Error::Decompression(e.to_string());
    zstd::stream::read::Decoder::with_buffer(payload)
        .map_err(failed)?
        .take(limit_u64.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(failed)?;
    if out.len() > limit {
        return Err(Error::TooLarge {
            size: out.len(),
            limit,
        });
    }
    Ok(out)
}

/// Refuses a map nested deeper than [`MAP_NESTING_MAX`]. Iterative, and stops at the first
/// path that is too deep.
fn check_nesting(value: &Crdt) -> Result<(), Error> {
    let Crdt::Map(map) = value else {
        return Ok(());
    };
    let mut pending: Vec<(&MapStore, usize)> = vec![(map.as_causal().store(), 0)];
    while let Some((store, nesting)) = pending.pop() {
        // The encoded structure counts, empty entries included: a tower of empty maps is
        // exactly what a hostile payload would send.
        for (_, fields) in store.raw_entries() {
            let nested = fields.map();
            if nested.raw_entries().next().is_none() {
                continue;
            }
            if nesting >= MAP_NESTING_MAX {
                return Err(Error::Payload(format!(
                    "map nested more than {MAP_NESTING_MAX} levels deep"
                )));
            }
            pending.push((nested, nesting + 1));
        }
    }
    Ok(())
}

/// Decodes an envelope that must hold a value of type `expected`; any other type is
/// [`Error::TypeMismatch`], reported before the payload is decoded.
pub fn decode_as(bytes: &[u8], expected: TypeTag, limits: &Limits) -> Result<Crdt, Error> {
    let found = peek_type(bytes)?;
    if found != expected {
        return Err(Error::TypeMismatch { expected, found });
    }
    decode(bytes, limits)
}
