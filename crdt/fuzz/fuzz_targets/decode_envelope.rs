//! Feeds arbitrary bytes to `envelope::decode`. Decoding must never panic, abort or overflow
//! the stack; whatever it accepts must re-encode, and the new bytes must decode to an equal
//! value and encode to the same bytes again.
//!
//! The checksum is a wall that random mutations rarely climb, so each input is also decoded a
//! second time with its length field and checksum repaired: that way mutations of the seed
//! envelopes reach decompression, the payload decoder and the invariant checks.
#![no_main]

use geostate_crdt::envelope::{self, Limits, Options, HEADER_LEN, TRAILER_LEN};
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8]) {
    // A small limit keeps decompression bombs cheap; it is a limit like any other.
    let limits = Limits {
        payload_bytes_max: 1 << 20,
    };
    let _ = envelope::peek_type(data);
    let Ok(value) = envelope::decode(data, &limits) else {
        return;
    };
    assert!(value.is_well_formed());
    let bytes = match envelope::encode(&value, &Options::default()) {
        Ok(bytes) => bytes,
        Err(e) => panic!("decoded value does not re-encode: {e}"),
    };
    match envelope::decode(&bytes, &Limits::default()) {
        Ok(again) => {
            assert_eq!(again, value, "re-encoded value decodes to another value");
            assert_eq!(
                envelope::encode(&again, &Options::default())
                    .ok()
                    .as_deref(),
                Some(bytes.as_slice()),
                "encoding is not stable"
            );
        }
        Err(e) => panic!("re-encoded value does not decode: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= HEADER_LEN + TRAILER_LEN {
        let mut repaired = data.to_vec();
        let body = repaired.len() - TRAILER_LEN;
        let declared = u32::try_from(body - HEADER_LEN).unwrap_or(u32::MAX);
        repaired[7..11].copy_from_slice(&declared.to_le_bytes());
        let crc = crc32c::crc32c(&repaired[..body]);
        repaired[body..].copy_from_slice(&crc.to_le_bytes());
        check(&repaired);
    }
});
