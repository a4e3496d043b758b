//! The storage envelope's test suite: golden vectors, corruption, hostile frames and fuzzing.
//!
//! # Golden vectors
//!
//! `tests/golden/*.bin` hold one envelope per case of [`golden_cases`], written by this build's
//! encoder. They pin the storage format: every file must keep decoding to the value rebuilt in
//! code (old envelopes stay readable), and re-encoding that value with default options must
//! give the file back byte for byte (the encoder is deterministic and unchanged).
//!
//! To regenerate them after a deliberate format change, run
//!
//! ```text
//! GEOSTATE_BLESS=1 cargo test -p geostate-crdt --test envelope golden
//! ```
//!
//! which writes the files instead of comparing, then review the diff. Never bless to make a
//! decode failure go away: a golden file that stops decoding means stored data would stop
//! decoding too. If only the byte-identity check fails (say, after a zstd upgrade changed the
//! compressed bytes), keep the old file as a decode-only vector under a new name and bless a
//! new one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use geostate_crdt::envelope::{
    self, Limits, Options, FLAG_COMPRESSED, FLAG_ENCRYPTED, FORMAT_VERSION, HEADER_LEN, MAGIC,
    MAP_NESTING_MAX, TRAILER_LEN,
};
use geostate_crdt::{
    ActorId, CounterOp, Crdt, Error, FieldOp, Hlc, MapOp, Op, RegisterOp, SetOp, TypeTag,
};
use proptest::prelude::*;
use serde::Serialize;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

const GOLDEN_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");

fn blessing() -> bool {
    std::env::var_os("GEOSTATE_BLESS").is_some_and(|v| v == "1")
}

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(GOLDEN_DIR).join(format!("{name}.bin"))
}

fn limits() -> Limits {
    Limits::default()
}

fn encode(value: &Crdt) -> Vec<u8> {
    envelope::encode(value, &Options::default()).unwrap()
}

fn decode(bytes: &[u8]) -> Result<Crdt, Error> {
    envelope::decode(bytes, &limits())
}

const fn actor(n: u64) -> ActorId {
    ActorId::new(n)
}

/// A fixed timestamp `ms` milliseconds after an arbitrary epoch.
fn at(ms: u64) -> Hlc {
    Hlc::new(1_700_000_000_000 + ms, 0)
}

/// Applies `op` at `replica` on behalf of `who` and returns the delta (already merged locally).
fn step(replica: &mut Crdt, who: u64, ms: u64, op: impl Into<Op>) -> Crdt {
    let delta = replica.apply(actor(who), at(ms), &op.into()).unwrap();
    replica.merge(&delta).unwrap();
    delta
}

fn update(replica: &mut Crdt, who: u64, ms: u64, key: &str, op: FieldOp) -> Crdt {
    step(replica, who, ms, MapOp::update(key, op))
}

/// `op` applied under the nested-map path `path` (outermost key first).
fn at_path(path: &[&str], op: FieldOp) -> MapOp {
    let (last, outer) = path.split_last().unwrap();
    let mut map_op = MapOp::update(*last, op);
    for key in outer.iter().rev() {
        map_op = MapOp::update(*key, FieldOp::Map(Box::new(map_op)));
    }
    map_op
}

fn join(into: &mut Crdt, other: &Crdt) {
    into.merge(other).unwrap();
}

/// An envelope around `payload` with a valid checksum, whatever the other fields say.
fn frame(tag: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(tag);
    out.push(flags);
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Recomputes the trailing checksum after the header or payload was edited in place.
fn reseal(bytes: &mut [u8]) {
    let body = bytes.len() - TRAILER_LEN;
    let crc = crc32c::crc32c(&bytes[..body]);
    bytes[body..].copy_from_slice(&crc.to_le_bytes());
}

/// The payload bytes of an envelope (as stored: compressed if the flag says so).
fn payload_of(bytes: &[u8]) -> &[u8] {
    &bytes[HEADER_LEN..bytes.len() - TRAILER_LEN]
}

/// Checks what every successful decode must satisfy: the value re-encodes, the new bytes decode
/// to an equal value, and encoding is stable from there on.
fn check_round_trip(value: &Crdt) -> Result<(), TestCaseError> {
    let bytes = envelope::encode(value, &Options::default())
        .map_err(|e| TestCaseError::fail(format!("decoded value does not re-encode: {e}")))?;
    let again = decode(&bytes)
        .map_err(|e| TestCaseError::fail(format!("re-encoded value does not decode: {e}")))?;
    prop_assert_eq!(&again, value);
    prop_assert_eq!(encode(&again), bytes);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Golden values, rebuilt deterministically
// ---------------------------------------------------------------------------------------------

fn g_counter() -> Crdt {
    let mut a = Crdt::empty(TypeTag::GCounter);
    let mut b = Crdt::empty(TypeTag::GCounter);
    let mut c = Crdt::empty(TypeTag::GCounter);
    step(&mut a, 1, 1, Op::GCounterInc(5));
    step(&mut a, 1, 2, Op::GCounterInc(2));
    step(&mut b, 2, 3, Op::GCounterInc(11));
    for ms in 4..7 {
        step(&mut c, 3, ms, Op::GCounterInc(1));
    }
    step(&mut c, 3, 7, Op::GCounterInc(u64::from(u32::MAX) + 7)); // a multi-byte varint
    join(&mut a, &b);
    join(&mut a, &c);
    a
}

fn pn_counter() -> Crdt {
    let mut a = Crdt::empty(TypeTag::PnCounter);
    let mut b = Crdt::empty(TypeTag::PnCounter);
    let mut c = Crdt::empty(TypeTag::PnCounter);
    step(&mut a, 1, 1, CounterOp::inc(10));
    step(&mut a, 1, 2, CounterOp::dec(3));
    step(&mut b, 2, 3, CounterOp::dec(7));
    step(&mut c, 3, 4, CounterOp::inc(4));
    step(&mut c, 3, 5, CounterOp::dec(4));
    step(&mut c, 3, 6, CounterOp::inc(300));
    join(&mut a, &b);
    join(&mut b, &c);
    join(&mut a, &b);
    a
}

fn or_set() -> Crdt {
    let mut a = Crdt::empty(TypeTag::OrSet);
    step(
        &mut a,
        1,
        1,
        SetOp::Add(vec![
            b"apple".to_vec(),
            b"banana".to_vec(),
            b"cherry".to_vec(),
        ]),
    );
    // b removes banana and adds date; concurrently c re-adds banana (add wins), then adds two
    // more elements of which a only ever receives the second: a dot outside the vector (cloud).
    let mut b = a.clone();
    step(&mut b, 2, 2, SetOp::remove("banana"));
    step(&mut b, 2, 3, SetOp::add("date"));
    let mut c = a.clone();
    let re_add = step(&mut c, 3, 2, SetOp::add("banana"));
    let _lost = step(&mut c, 3, 3, SetOp::add("elder"));
    let late = step(&mut c, 3, 4, SetOp::add(vec![0u8, 0xff, 0x80]));
    join(&mut a, &b);
    join(&mut a, &re_add);
    join(&mut a, &late);
    assert!(
        a.context().cloud_len() > 0,
        "the golden set must pin a cloud dot"
    );
    a
}

fn or_set_cleared() -> Crdt {
    let mut a = Crdt::empty(TypeTag::OrSet);
    step(&mut a, 1, 1, SetOp::Add(vec![b"x".to_vec(), b"y".to_vec()]));
    step(&mut a, 2, 2, SetOp::add("z"));
    step(&mut a, 1, 3, SetOp::Clear);
    a
}

/// An OR-set whose payload is well above the 4 KiB threshold, so the zstd path is pinned.
fn or_set_large() -> Crdt {
    let mut a = Crdt::empty(TypeTag::OrSet);
    let many: Vec<Vec<u8>> = (0..600)
        .map(|i| format!("sku-{i:05}").into_bytes())
        .collect();
    step(&mut a, 1, 1, SetOp::Add(many));
    let mut b = a.clone();
    for i in 0..50u64 {
        step(&mut b, 2, 2 + i, SetOp::add(format!("extra-{i:03}")));
    }
    step(&mut b, 2, 60, SetOp::remove("sku-00007"));
    join(&mut a, &b);
    a
}

fn lww_register() -> Crdt {
    let mut a = Crdt::empty(TypeTag::LwwRegister);
    step(&mut a, 1, 50, Op::Lww(RegisterOp::write("v0")));
    step(&mut a, 1, 100, Op::Lww(RegisterOp::write("v1"))); // overwrites v0
    let mut b = Crdt::empty(TypeTag::LwwRegister);
    step(&mut b, 2, 200, Op::Lww(RegisterOp::write("v2")));
    let mut c = Crdt::empty(TypeTag::LwwRegister);
    step(&mut c, 3, 150, Op::Lww(RegisterOp::write("v3")));
    join(&mut a, &b);
    join(&mut a, &c);
    let Crdt::LwwRegister(r) = &a else {
        unreachable!()
    };
    assert_eq!(r.value(), Some(&b"v2".to_vec()));
    a
}

fn mv_register() -> Crdt {
    let mut a = Crdt::empty(TypeTag::MvRegister);
    step(&mut a, 1, 10, Op::Mv(RegisterOp::write("x")));
    let mut b = a.clone();
    let mut c = a.clone();
    step(&mut b, 2, 20, Op::Mv(RegisterOp::write("y")));
    step(&mut c, 3, 20, Op::Mv(RegisterOp::write("z")));
    join(&mut a, &b);
    join(&mut a, &c);
    let Crdt::MvRegister(r) = &a else {
        unreachable!()
    };
    assert_eq!(r.len(), 2, "the golden MV register must hold siblings");
    a
}

/// Every field type, at the top level and nested two maps deep, plus removed keys.
fn every_field(path: &[&str], who: u64, ms: u64, replica: &mut Crdt) {
    let ops = [
        FieldOp::Counter(CounterOp::inc(3)),
        FieldOp::Counter(CounterOp::dec(1)),
        FieldOp::Set(SetOp::Add(vec![b"red".to_vec(), b"green".to_vec()])),
        FieldOp::Set(SetOp::remove("red")),
        FieldOp::Lww(RegisterOp::write("alice")),
        FieldOp::Mv(RegisterOp::write("draft")),
    ];
    for (i, op) in ops.into_iter().enumerate() {
        step(replica, who, ms + i as u64, at_path(path, op));
    }
}

fn map() -> Crdt {
    let mut a = Crdt::empty(TypeTag::Map);
    every_field(&["profile"], 1, 1, &mut a);
    every_field(&["nested", "inner"], 1, 10, &mut a);
    every_field(&["nested", "inner", "leaf"], 1, 20, &mut a);
    update(&mut a, 1, 30, "gone", FieldOp::Counter(CounterOp::inc(1)));
    update(&mut a, 1, 31, "gone", FieldOp::Set(SetOp::add("x")));
    step(
        &mut a,
        1,
        32,
        at_path(&["nested", "tmp"], FieldOp::Lww(RegisterOp::write("t"))),
    );
    let mut b = a.clone();
    let mut c = a.clone();
    step(&mut b, 2, 40, MapOp::remove("gone"));
    step(
        &mut b,
        2,
        41,
        at_path(&["nested", "inner"], FieldOp::Mv(RegisterOp::write("b"))),
    );
    step(
        &mut b,
        2,
        42,
        MapOp::update("nested", FieldOp::Map(Box::new(MapOp::remove("tmp")))),
    );
    update(
        &mut b,
        2,
        43,
        "profile",
        FieldOp::Counter(CounterOp::inc(5)),
    );
    // Concurrent with b: siblings in the nested MV field, another counter actor.
    step(
        &mut c,
        3,
        40,
        at_path(&["nested", "inner"], FieldOp::Mv(RegisterOp::write("c"))),
    );
    update(
        &mut c,
        3,
        41,
        "profile",
        FieldOp::Counter(CounterOp::dec(2)),
    );
    update(
        &mut c,
        3,
        42,
        "profile",
        FieldOp::Lww(RegisterOp::write("carol")),
    );
    join(&mut a, &b);
    join(&mut a, &c);
    let Crdt::Map(m) = &a else { unreachable!() };
    assert!(m.get("gone").is_none());
    assert!(m.get("nested").unwrap().map().get("tmp").is_none());
    assert_eq!(
        m.get("nested")
            .unwrap()
            .map()
            .get("inner")
            .unwrap()
            .mv()
            .count(),
        2
    );
    a
}

/// Every golden case: file stem and the value it must decode to.
fn golden_cases() -> Vec<(String, Crdt)> {
    let mut cases: Vec<(String, Crdt)> = vec![
        ("g_counter".into(), g_counter()),
        ("pn_counter".into(), pn_counter()),
        ("or_set".into(), or_set()),
        ("or_set_cleared".into(), or_set_cleared()),
        ("or_set_large_zstd".into(), or_set_large()),
        ("lww_register".into(), lww_register()),
        ("mv_register".into(), mv_register()),
        ("map".into(), map()),
    ];
    for tag in TypeTag::ALL {
        let name = format!("empty_{}", tag.name().replace('-', "_"));
        cases.push((name, Crdt::empty(tag)));
    }
    cases
}

/// The golden envelopes as stored (freshly encoded while blessing, so that the other tests of
/// a blessing run never read a half-written file).
fn golden_envelopes() -> Vec<(String, Vec<u8>)> {
    golden_cases()
        .into_iter()
        .map(|(name, value)| {
            let bytes = if blessing() {
                encode(&value)
            } else {
                let path = golden_path(&name);
                std::fs::read(&path).unwrap_or_else(|e| {
                    panic!(
                        "{}: {e}; regenerate with GEOSTATE_BLESS=1 cargo test -p geostate-crdt \
                         --test envelope golden",
                        path.display()
                    )
                })
            };
            (name, bytes)
        })
        .collect()
}

fn golden(name: &str) -> Vec<u8> {
    golden_envelopes()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, bytes)| bytes)
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Golden vectors
// ---------------------------------------------------------------------------------------------

#[test]
fn golden_vectors_decode_and_reencode_byte_identically() {
    let cases = golden_cases();
    if blessing() {
        std::fs::create_dir_all(GOLDEN_DIR).unwrap();
        for (name, value) in &cases {
            let path = golden_path(name);
            let tmp = path.with_extension("bin.tmp");
            std::fs::write(&tmp, encode(value)).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
        eprintln!("blessed {} golden envelopes in {GOLDEN_DIR}", cases.len());
        return;
    }
    for ((name, value), (_, stored)) in cases.iter().zip(golden_envelopes()) {
        assert_eq!(
            envelope::peek_type(&stored).unwrap(),
            value.type_tag(),
            "{name}: type tag"
        );
        let decoded =
            decode(&stored).unwrap_or_else(|e| panic!("{name}: golden no longer decodes: {e}"));
        assert_eq!(&decoded, value, "{name}: golden decodes to another value");
        let decoded_as = envelope::decode_as(&stored, value.type_tag(), &limits()).unwrap();
        assert_eq!(&decoded_as, value, "{name}: decode_as");
        assert!(
            encode(value) == stored,
            "{name}: the encoder no longer reproduces the golden bytes (see the file's docs)"
        );
    }
    // Every file in the folder is checked: a stray golden is either a case or a mistake.
    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(GOLDEN_DIR).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "bin") {
            on_disk.insert(path.file_stem().unwrap().to_string_lossy().into_owned());
        }
    }
    let expected: BTreeSet<String> = cases.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(on_disk, expected, "golden files on disk vs golden cases");
}

#[test]
fn golden_vectors_cover_every_type_and_the_compressed_path() {
    let envelopes = golden_envelopes();
    let tags: BTreeSet<TypeTag> = envelopes
        .iter()
        .map(|(_, b)| envelope::peek_type(b).unwrap())
        .collect();
    assert_eq!(tags, TypeTag::ALL.into_iter().collect());
    for (name, bytes) in &envelopes {
        let flags = bytes[6];
        if name == "or_set_large_zstd" {
            assert_eq!(flags, FLAG_COMPRESSED, "{name} must take the zstd path");
            let raw = envelope::canonical_payload(&decode(bytes).unwrap()).unwrap();
            assert!(raw.len() > Options::default().compress_threshold_bytes);
            assert!(payload_of(bytes).len() < raw.len());
        } else {
            assert_eq!(flags, 0, "{name} is small and must stay uncompressed");
        }
    }
}

/// The positive control for the hand-made payloads below: the mirror types encode a real value
/// to exactly the payload the crate writes.
#[test]
fn mirror_types_reproduce_the_golden_or_set_payload() {
    let bytes = golden("or_set");
    let Crdt::OrSet(set) = decode(&bytes).unwrap() else {
        unreachable!()
    };
    let store: BTreeMap<Vec<u8>, BTreeSet<RawDot>> = set
        .entries()
        .map(|(e, dots)| (e.clone(), dots.iter().map(RawDot::from).collect()))
        .collect();
    let ctx = set.as_causal().context();
    let raw = RawCausal {
        store,
        ctx: RawCtx {
            vv: ctx
                .version_vector()
                .iter()
                .map(|(a, n)| (a.get(), n))
                .collect(),
            cloud: ctx.cloud().map(RawDot::from).collect(),
        },
    };
    assert_eq!(raw_payload(&raw), payload_of(&bytes));
}

// ---------------------------------------------------------------------------------------------
// Corruption
// ---------------------------------------------------------------------------------------------

#[test]
fn every_single_bit_flip_of_every_golden_is_an_error() {
    let mut total = 0usize;
    let mut rejected = 0usize;
    for (name, bytes) in golden_envelopes() {
        let payload_end = bytes.len() - TRAILER_LEN;
        for bit in 0..bytes.len() * 8 {
            let mut corrupt = bytes.clone();
            corrupt[bit / 8] ^= 1 << (bit % 8);
            total += 1;
            let result = decode(&corrupt);
            if result.is_err() {
                rejected += 1;
            }
            assert!(
                envelope::peek_type(&corrupt).is_err(),
                "{name} bit {bit}: peek_type"
            );
            // Each region of the envelope fails for its own reason.
            let ok_kind = match (bit / 8, &result) {
                (0..=3, Err(Error::BadMagic)) => true,
                (4, Err(Error::UnknownVersion(_))) => true,
                (7..=10, Err(Error::Truncated { .. } | Error::TrailingBytes { .. })) => true,
                (5 | 6, Err(Error::ChecksumMismatch { .. })) => true,
                (i, Err(Error::ChecksumMismatch { .. })) => i >= HEADER_LEN,
                _ => false,
            };
            assert!(
                ok_kind,
                "{name}: flipping bit {bit} (byte {} of {}, payload ends at {payload_end}) gave {result:?}",
                bit / 8,
                bytes.len()
            );
        }
    }
    assert_eq!(rejected, total, "bit flips that decoded");
    assert!(total > 10_000, "only {total} bits flipped");
}

#[test]
fn every_truncation_is_an_error() {
    for (name, bytes) in golden_envelopes() {
        for len in 0..bytes.len() {
            let result = decode(&bytes[..len]);
            assert!(
                matches!(result, Err(Error::Truncated { .. } | Error::BadMagic)),
                "{name} cut to {len} bytes gave {result:?}"
            );
            assert!(envelope::peek_type(&bytes[..len]).is_err());
        }
    }
}

#[test]
fn trailing_bytes_are_an_error() {
    for (name, bytes) in golden_envelopes() {
        for extra in [1usize, 2, 3, 4, 15, 1000] {
            for fill in [0x00u8, 0xff] {
                let mut longer = bytes.clone();
                longer.resize(bytes.len() + extra, fill);
                assert_eq!(
                    decode(&longer),
                    Err(Error::TrailingBytes { extra }),
                    "{name} + {extra} bytes"
                );
            }
        }
        // Two envelopes back to back are not one envelope.
        let twice = [bytes.clone(), bytes.clone()].concat();
        assert_eq!(
            decode(&twice),
            Err(Error::TrailingBytes { extra: bytes.len() })
        );
    }
}

#[test]
fn bad_magic_is_an_error() {
    let bytes = golden("g_counter");
    for i in 0..MAGIC.len() {
        let mut corrupt = bytes.clone();
        corrupt[i] = b'X';
        reseal(&mut corrupt);
        assert_eq!(decode(&corrupt), Err(Error::BadMagic));
    }
    assert_eq!(decode(b"GSTX"), Err(Error::BadMagic));
    assert_eq!(decode(b"{\"json\": true}"), Err(Error::BadMagic));
}

#[test]
fn unknown_version_is_an_error_even_with_a_valid_checksum() {
    for (name, bytes) in golden_envelopes() {
        for version in [0u8, 2, 3, 0x7f, 0x80, 0xff] {
            let mut other = bytes.clone();
            other[4] = version;
            reseal(&mut other);
            assert_eq!(
                decode(&other),
                Err(Error::UnknownVersion(version)),
                "{name} v{version}"
            );
        }
    }
}

#[test]
fn unknown_type_tag_with_valid_checksum_is_an_error() {
    for (name, bytes) in golden_envelopes() {
        for tag in 0..=u8::MAX {
            if TypeTag::from_u8(tag).is_ok() {
                continue;
            }
            let mut other = bytes.clone();
            other[5] = tag;
            reseal(&mut other);
            assert_eq!(decode(&other), Err(Error::UnknownTypeTag(tag)), "{name}");
            assert_eq!(envelope::peek_type(&other), Err(Error::UnknownTypeTag(tag)));
        }
    }
}

#[test]
fn encrypted_or_unknown_flags_with_valid_checksum_are_an_error() {
    for (name, bytes) in golden_envelopes() {
        let compressed = bytes[6] & FLAG_COMPRESSED;
        for flags in 0..=u8::MAX {
            if flags & !FLAG_COMPRESSED == 0 {
                continue;
            }
            let mut other = bytes.clone();
            other[6] = flags;
            reseal(&mut other);
            assert_eq!(
                decode(&other),
                Err(Error::UnsupportedFlags(flags)),
                "{name} flags {flags:#04x}"
            );
        }
        let mut encrypted = bytes.clone();
        encrypted[6] = compressed | FLAG_ENCRYPTED;
        reseal(&mut encrypted);
        assert_eq!(
            decode(&encrypted),
            Err(Error::UnsupportedFlags(compressed | FLAG_ENCRYPTED))
        );
    }
}

#[test]
fn decode_as_the_wrong_type_is_a_type_mismatch() {
    for (name, bytes) in golden_envelopes() {
        let found = envelope::peek_type(&bytes).unwrap();
        for expected in TypeTag::ALL {
            let result = envelope::decode_as(&bytes, expected, &limits());
            if expected == found {
                assert!(result.is_ok(), "{name}");
            } else {
                assert_eq!(
                    result,
                    Err(Error::TypeMismatch { expected, found }),
                    "{name}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Size limits and compression
// ---------------------------------------------------------------------------------------------

#[test]
fn decompressed_size_above_the_limit_is_an_error() {
    let bytes = golden("or_set_large_zstd");
    let raw_len = envelope::canonical_payload(&or_set_large()).unwrap().len();
    let exact = Limits {
        payload_bytes_max: raw_len,
    };
    assert_eq!(envelope::decode(&bytes, &exact).unwrap(), or_set_large());
    let tight = Limits {
        payload_bytes_max: raw_len - 1,
    };
    let result = envelope::decode(&bytes, &tight);
    assert!(
        matches!(
            result,
            Err(Error::Decompression(_) | Error::TooLarge { .. })
        ),
        "{result:?}"
    );
}

#[test]
fn a_huge_decode_limit_is_not_a_huge_allocation() {
    // `usize::MAX` reads as "no limit"; decoding must neither panic nor reserve that much.
    let unlimited = Limits {
        payload_bytes_max: usize::MAX,
    };
    for (name, bytes) in golden_envelopes() {
        assert!(envelope::decode(&bytes, &unlimited).is_ok(), "{name}");
    }
}

#[test]
fn decompression_bombs_are_refused() {
    let limit = 1024 * 1024;
    let small = Limits {
        payload_bytes_max: limit,
    };
    let zeros = vec![0u8; limit + 1];
    // A frame that declares its size: refused from the header.
    let declared = zstd::bulk::compress(&zeros, 3).unwrap();
    assert!(declared.len() < 1024);
    let result = envelope::decode(&frame(3, FLAG_COMPRESSED, &declared), &small);
    assert!(
        matches!(
            result,
            Err(Error::TooLarge { .. } | Error::Decompression(_))
        ),
        "{result:?}"
    );
    // A streamed frame that does not: cut off one byte past the limit.
    let streamed = zstd::stream::encode_all(&zeros[..], 3).unwrap();
    assert_eq!(
        zstd::zstd_safe::get_frame_content_size(&streamed).unwrap(),
        None
    );
    let result = envelope::decode(&frame(3, FLAG_COMPRESSED, &streamed), &small);
    assert!(
        matches!(
            result,
            Err(Error::TooLarge { .. } | Error::Decompression(_))
        ),
        "{result:?}"
    );
    // The same bomb against the default limit (64 MiB) is refused too.
    let big = vec![0u8; Limits::default().payload_bytes_max + 1];
    let bomb = zstd::bulk::compress(&big, 1).unwrap();
    let result = decode(&frame(6, FLAG_COMPRESSED, &bomb));
    assert!(
        matches!(
            result,
            Err(Error::TooLarge { .. } | Error::Decompression(_))
        ),
        "{result:?}"
    );
}

#[test]
fn corrupt_compressed_payloads_are_decompression_errors() {
    let bytes = golden("or_set_large_zstd");
    let compressed = payload_of(&bytes).to_vec();
    // Not zstd at all.
    let result = decode(&frame(3, FLAG_COMPRESSED, b"definitely not zstd"));
    assert!(matches!(result, Err(Error::Decompression(_))), "{result:?}");
    assert!(matches!(
        decode(&frame(3, FLAG_COMPRESSED, &[])),
        Err(Error::Decompression(_))
    ));
    // A zstd frame cut short, at every length.
    for len in 0..compressed.len() {
        let result = decode(&frame(3, FLAG_COMPRESSED, &compressed[..len]));
        assert!(
            matches!(result, Err(Error::Decompression(_) | Error::Payload(_))),
            "cut to {len}: {result:?}"
        );
    }
    // A zstd frame followed by garbage.
    let mut followed = compressed.clone();
    followed.extend_from_slice(b"garbage");
    let result = decode(&frame(3, FLAG_COMPRESSED, &followed));
    assert!(result.is_err(), "{result:?}");
}

#[test]
fn compressed_small_payloads_from_other_writers_decode() {
    // This encoder keeps small payloads raw, but a compressed one (with or without a declared
    // size) is still a valid envelope; re-encoding gives the canonical bytes.
    for (name, bytes) in golden_envelopes() {
        if bytes[6] & FLAG_COMPRESSED != 0 {
            continue;
        }
        let value = decode(&bytes).unwrap();
        let raw = payload_of(&bytes);
        for compressed in [
            zstd::bulk::compress(raw, 19).unwrap(),
            zstd::stream::encode_all(raw, 1).unwrap(),
        ] {
            let other = frame(bytes[5], FLAG_COMPRESSED, &compressed);
            assert_eq!(decode(&other).unwrap(), value, "{name}");
            assert_eq!(encode(&value), bytes);
        }
    }
}

#[test]
fn payload_above_the_decode_limit_is_too_large() {
    let bytes = golden("map");
    let len = payload_of(&bytes).len();
    let tight = Limits {
        payload_bytes_max: len - 1,
    };
    assert_eq!(
        envelope::decode(&bytes, &tight),
        Err(Error::TooLarge {
            size: len,
            limit: len - 1
        })
    );
    let exact = Limits {
        payload_bytes_max: len,
    };
    assert!(envelope::decode(&bytes, &exact).is_ok());
}

#[test]
fn payload_above_the_encode_limit_is_too_large() {
    let value = map();
    let len = envelope::canonical_payload(&value).unwrap().len();
    let tight = Options {
        payload_bytes_max: 10,
        ..Options::default()
    };
    assert_eq!(
        envelope::encode(&value, &tight),
        Err(Error::TooLarge {
            size: len,
            limit: 10
        })
    );
    let exact = Options {
        payload_bytes_max: len,
        ..Options::default()
    };
    assert!(envelope::encode(&value, &exact).is_ok());
}

#[test]
fn compression_options_round_trip() {
    for (name, value) in golden_cases() {
        for threshold in [0usize, 1, 64, usize::MAX] {
            for level in [1, 3, 19] {
                let options = Options {
                    compress_threshold_bytes: threshold,
                    zstd_level: level,
                    ..Options::default()
                };
                let bytes = envelope::encode(&value, &options).unwrap();
                assert_eq!(decode(&bytes).unwrap(), value, "{name} {options:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Well-framed, bad payloads
// ---------------------------------------------------------------------------------------------

#[test]
fn garbage_payload_with_valid_frame_is_a_payload_error() {
    for tag in TypeTag::ALL {
        let t = tag.as_u8();
        for garbage in [
            &b""[..],
            &[0xff],
            &[0x05],
            &[0xfb, 0xff],
            &[0x01, 0x01],
            &[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            b"this is not bincode at all, not for any type",
        ] {
            let result = decode(&frame(t, 0, garbage));
            assert!(
                matches!(result, Err(Error::Payload(_))),
                "{tag} {garbage:?}: {result:?}"
            );
        }
    }
    // A valid payload with one byte too many.
    for (name, bytes) in golden_envelopes() {
        if bytes[6] != 0 {
            continue;
        }
        let mut payload = payload_of(&bytes).to_vec();
        payload.push(0);
        let result = decode(&frame(bytes[5], 0, &payload));
        assert!(
            matches!(result, Err(Error::Payload(_))),
            "{name}: {result:?}"
        );
    }
}

#[test]
fn a_payload_of_another_type_is_an_error_not_a_silent_reinterpretation() {
    // Some payloads happen to parse as another type (every empty state is two zero bytes), but
    // a non-trivial one does not; what matters is that decoding never panics and an accepted
    // value is well formed.
    for (name, bytes) in golden_envelopes() {
        if bytes[6] != 0 {
            continue;
        }
        for tag in TypeTag::ALL {
            let other = frame(tag.as_u8(), 0, payload_of(&bytes));
            if let Ok(value) = decode(&other) {
                assert_eq!(value.type_tag(), tag, "{name}");
                assert!(value.is_well_formed(), "{name} as {tag}");
            }
        }
    }
}

/// Mirrors of the crate's serde shapes, to build payloads the crate would never write.
#[derive(Serialize, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct RawDot {
    actor: u64,
    counter: u64,
}

impl From<geostate_crdt::Dot> for RawDot {
    fn from(d: geostate_crdt::Dot) -> Self {
        RawDot {
            actor: d.actor.get(),
            counter: d.counter,
        }
    }
}

const fn dot(actor: u64, counter: u64) -> RawDot {
    RawDot { actor, counter }
}

#[derive(Serialize, Default, Clone)]
struct RawCtx {
    vv: BTreeMap<u64, u64>,
    cloud: BTreeSet<RawDot>,
}

impl RawCtx {
    fn of(vv: &[(u64, u64)], cloud: &[RawDot]) -> Self {
        RawCtx {
            vv: vv.iter().copied().collect(),
            cloud: cloud.iter().copied().collect(),
        }
    }
}

#[derive(Serialize, Clone)]
struct RawCausal<S> {
    store: S,
    ctx: RawCtx,
}

#[derive(Serialize, Clone)]
struct RawEntry {
    inc: u64,
    dec: u64,
}

#[derive(Serialize, Clone)]
struct RawHlc {
    physical_ms: u64,
    logical: u32,
}

#[derive(Serialize, Clone)]
struct RawStamped {
    hlc: RawHlc,
    value: Vec<u8>,
}

#[derive(Serialize, Default, Clone)]
struct RawFields {
    counter: BTreeMap<RawDot, RawEntry>,
    set: BTreeMap<Vec<u8>, BTreeSet<RawDot>>,
    lww: BTreeMap<RawDot, RawStamped>,
    mv: BTreeMap<RawDot, RawStamped>,
    map: BTreeMap<String, RawFields>,
}

type RawSet = RawCausal<BTreeMap<Vec<u8>, BTreeSet<RawDot>>>;
type RawCounter = RawCausal<BTreeMap<RawDot, RawEntry>>;
type RawRegister = RawCausal<BTreeMap<RawDot, RawStamped>>;
type RawMap = RawCausal<BTreeMap<String, RawFields>>;

fn raw_payload<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard()).unwrap()
}

fn decode_raw<T: Serialize>(tag: TypeTag, value: &T) -> Result<Crdt, Error> {
    decode(&frame(tag.as_u8(), 0, &raw_payload(value)))
}

fn raw_set(store: &[(&[u8], &[RawDot])], ctx: RawCtx) -> RawSet {
    RawCausal {
        store: store
            .iter()
            .map(|(e, dots)| (e.to_vec(), dots.iter().copied().collect()))
            .collect(),
        ctx,
    }
}

fn stamped(ms: u64, value: &[u8]) -> RawStamped {
    RawStamped {
        hlc: RawHlc {
            physical_ms: ms,
            logical: 0,
        },
        value: value.to_vec(),
    }
}

fn assert_payload_error(result: Result<Crdt, Error>, what: &str) {
    assert!(
        matches!(result, Err(Error::Payload(_))),
        "{what}: expected a payload error, got {result:?}"
    );
}

#[test]
fn or_set_with_a_live_dot_outside_its_context_is_a_payload_error() {
    let ctx = RawCtx::of(&[(1, 2)], &[]);
    // Control: the same shape with every dot covered decodes.
    let good = raw_set(&[(b"a", &[dot(1, 1)]), (b"b", &[dot(1, 2)])], ctx.clone());
    let Crdt::OrSet(set) = decode_raw(TypeTag::OrSet, &good).unwrap() else {
        unreachable!()
    };
    assert_eq!(set.len(), 2);
    // One live dot the context has not seen.
    let bad = raw_set(&[(b"a", &[dot(1, 1)]), (b"b", &[dot(1, 3)])], ctx.clone());
    assert_payload_error(decode_raw(TypeTag::OrSet, &bad), "live dot past the vector");
    let bad = raw_set(&[(b"a", &[dot(2, 1)])], ctx);
    assert_payload_error(
        decode_raw(TypeTag::OrSet, &bad),
        "live dot of an unseen actor",
    );
}

#[test]
fn non_canonical_contexts_are_payload_errors() {
    let cases: [(&str, RawCtx); 4] = [
        ("zero vector entry", RawCtx::of(&[(1, 2), (2, 0)], &[])),
        (
            "cloud dot covered by the vector",
            RawCtx::of(&[(1, 2)], &[dot(1, 2)]),
        ),
        (
            "cloud dot right after the vector",
            RawCtx::of(&[(1, 2)], &[dot(1, 3)]),
        ),
        ("cloud dot with counter 1", RawCtx::of(&[], &[dot(1, 1)])),
    ];
    for (what, ctx) in cases {
        let set = raw_set(&[(b"a", &[dot(1, 1)])], ctx);
        assert_payload_error(decode_raw(TypeTag::OrSet, &set), what);
    }
    // Control: a real gap is canonical.
    let set = raw_set(&[(b"a", &[dot(1, 5)])], RawCtx::of(&[(1, 2)], &[dot(1, 5)]));
    assert!(decode_raw(TypeTag::OrSet, &set).is_ok());
}

#[test]
fn counters_and_registers_with_bad_invariants_are_payload_errors() {
    let counter = |dec: u64, ctx: RawCtx| RawCounter {
        store: [(dot(1, 1), RawEntry { inc: 5, dec })]
            .into_iter()
            .collect(),
        ctx,
    };
    let covered = RawCtx::of(&[(1, 1)], &[]);
    assert!(decode_raw(TypeTag::GCounter, &counter(0, covered.clone())).is_ok());
    assert!(decode_raw(TypeTag::PnCounter, &counter(3, covered.clone())).is_ok());
    assert_payload_error(
        decode_raw(TypeTag::GCounter, &counter(3, covered)),
        "g-counter with a decrement",
    );
    assert_payload_error(
        decode_raw(TypeTag::PnCounter, &counter(0, RawCtx::default())),
        "counter entry outside the context",
    );
    let register = |ctx: RawCtx| RawRegister {
        store: [(dot(1, 1), stamped(1, b"a")), (dot(2, 1), stamped(2, b"b"))]
            .into_iter()
            .collect(),
        ctx,
    };
    for tag in [TypeTag::LwwRegister, TypeTag::MvRegister] {
        assert!(decode_raw(tag, &register(RawCtx::of(&[(1, 1), (2, 1)], &[]))).is_ok());
        assert_payload_error(
            decode_raw(tag, &register(RawCtx::of(&[(1, 1)], &[]))),
            "register sibling outside the context",
        );
    }
}

#[test]
fn map_with_a_nested_dot_outside_its_context_is_a_payload_error() {
    let leaf = |counter: u64| RawFields {
        counter: [(dot(1, counter), RawEntry { inc: 1, dec: 0 })]
            .into_iter()
            .collect(),
        set: [(b"s".to_vec(), [dot(1, 2)].into_iter().collect())]
            .into_iter()
            .collect(),
        lww: [(dot(1, 3), stamped(3, b"l"))].into_iter().collect(),
        mv: [(dot(2, 1), stamped(3, b"m"))].into_iter().collect(),
        ..RawFields::default()
    };
    let build = |counter: u64| RawMap {
        store: [(
            "outer".to_string(),
            RawFields {
                map: [("inner".to_string(), leaf(counter))].into_iter().collect(),
                ..RawFields::default()
            },
        )]
        .into_iter()
        .collect(),
        ctx: RawCtx::of(&[(1, 3), (2, 1)], &[]),
    };
    let Crdt::Map(m) = decode_raw(TypeTag::Map, &build(1)).unwrap() else {
        unreachable!()
    };
    let inner = m.get("outer").unwrap().map().get("inner").unwrap();
    assert_eq!(inner.counter(), 1);
    assert_eq!(inner.lww(), Some(&b"l"[..]));
    assert_payload_error(
        decode_raw(TypeTag::Map, &build(9)),
        "nested counter dot outside the context",
    );
}

/// A removal delta names the keys it touched with empty entries (see `DotMap`), and deltas
/// travel in envelopes: decoding must keep accepting them. (A *state* never holds an empty
/// entry, but the envelope cannot tell a state from a delta, so the check cannot be stricter.)
#[test]
fn removal_deltas_with_empty_entries_travel_in_envelopes() {
    let mut here = Crdt::empty(TypeTag::OrSet);
    step(
        &mut here,
        1,
        1,
        SetOp::Add(vec![b"a".to_vec(), b"b".to_vec()]),
    );
    let mut there = here.clone();
    let removal = step(&mut here, 1, 2, SetOp::remove("a"));
    let shipped = decode(&encode(&removal)).unwrap();
    assert_eq!(shipped, removal);
    there.merge(&shipped).unwrap();
    assert_eq!(there, here);
    // The same for a map key and a map field.
    let mut here = Crdt::empty(TypeTag::Map);
    update(&mut here, 1, 1, "k", FieldOp::Set(SetOp::add("e")));
    update(&mut here, 1, 2, "j", FieldOp::Counter(CounterOp::inc(1)));
    let mut there = here.clone();
    let removals = [
        step(
            &mut here,
            1,
            3,
            MapOp::update("k", FieldOp::Set(SetOp::remove("e"))),
        ),
        step(&mut here, 1, 4, MapOp::remove("j")),
    ];
    for removal in &removals {
        let shipped = decode(&encode(removal)).unwrap();
        assert_eq!(&shipped, removal);
        there.merge(&shipped).unwrap();
    }
    assert_eq!(there, here);
    let Crdt::Map(m) = &there else { unreachable!() };
    assert!(m.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Nesting
// ---------------------------------------------------------------------------------------------

/// A map whose deepest entry sits `nesting` maps below the top level and holds every field.
fn nested_map(nesting: usize) -> Crdt {
    let keys: Vec<String> = (0..=nesting).map(|i| format!("k{i}")).collect();
    let path: Vec<&str> = keys.iter().map(String::as_str).collect();
    let mut value = Crdt::empty(TypeTag::Map);
    every_field(&path, 1, 1, &mut value);
    value
}

#[test]
fn maps_nested_up_to_the_limit_round_trip() {
    let value = nested_map(MAP_NESTING_MAX);
    let bytes = encode(&value);
    assert_eq!(decode(&bytes).unwrap(), value);
    let compressed = Options {
        compress_threshold_bytes: 0,
        ..Options::default()
    };
    assert_eq!(
        decode(&envelope::encode(&value, &compressed).unwrap()).unwrap(),
        value
    );
}

#[test]
fn maps_nested_past_the_limit_are_refused_both_ways() {
    // Encoding refuses what decoding would refuse: nothing is written that cannot be read.
    let value = nested_map(MAP_NESTING_MAX + 1);
    assert!(matches!(
        envelope::encode(&value, &Options::default()),
        Err(Error::Payload(_))
    ));
    // The same shapes, hand-made: at the limit, and one level past it.
    let raw = |nesting: usize| {
        let leaf = RawFields {
            counter: [(dot(1, 1), RawEntry { inc: 1, dec: 0 })]
                .into_iter()
                .collect(),
            ..RawFields::default()
        };
        let mut store: BTreeMap<String, RawFields> =
            [("k".to_string(), leaf)].into_iter().collect();
        for _ in 0..nesting {
            let fields = RawFields {
                map: store,
                ..RawFields::default()
            };
            store = [("k".to_string(), fields)].into_iter().collect();
        }
        RawMap {
            store,
            ctx: RawCtx::of(&[(1, 1)], &[]),
        }
    };
    assert!(decode_raw(TypeTag::Map, &raw(MAP_NESTING_MAX)).is_ok());
    assert_payload_error(
        decode_raw(TypeTag::Map, &raw(MAP_NESTING_MAX + 1)),
        "one level too deep",
    );
}

#[test]
fn hostile_nesting_is_an_error_not_a_stack_overflow() {
    // Each level: one entry, an empty key, four empty fields, then the nested map. A million
    // levels in 6 MB used to overflow the stack (aborting the process) before any check ran.
    for levels in [MAP_NESTING_MAX + 2, 1_000, 1_000_000] {
        let mut payload = Vec::with_capacity(levels * 6 + 3);
        for _ in 0..levels {
            payload.extend_from_slice(&[1, 0, 0, 0, 0, 0]);
        }
        payload.extend_from_slice(&[0, 0, 0]);
        let result = decode(&frame(TypeTag::Map.as_u8(), 0, &payload));
        assert!(
            matches!(&result, Err(Error::Payload(m)) if m.contains("nested more than")),
            "{levels} levels: {result:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------------------------

/// One edit of an envelope.
#[derive(Clone, Debug)]
enum Mutation {
    Overwrite(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Xor(usize, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), 1..=u8::MAX).prop_map(|(i, b)| Mutation::Xor(i, b)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    match *m {
        Mutation::Overwrite(i, b) if !bytes.is_empty() => {
            let len = bytes.len();
            bytes[i % len] = b;
        }
        Mutation::Xor(i, b) if !bytes.is_empty() => {
            let len = bytes.len();
            bytes[i % len] ^= b;
        }
        Mutation::Insert(i, b) => {
            let at = i % (bytes.len() + 1);
            bytes.insert(at, b);
        }
        Mutation::Delete(i) if !bytes.is_empty() => {
            let len = bytes.len();
            bytes.remove(i % len);
        }
        _ => {}
    }
}

/// Bytes that are mostly small (lengths, counts, varints), so random payloads get past the
/// first length prefix and exercise the decoder's depths.
fn payload_bytes(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop_oneof![4 => 0u8..4, 1 => any::<u8>()], 0..max_len)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(value) = decode(&bytes) {
            check_round_trip(&value)?;
        }
        let _ = envelope::peek_type(&bytes);
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(
        tag in 0u8..8,
        tail in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&[FORMAT_VERSION, tag]);
        bytes.extend_from_slice(&tail);
        if let Ok(value) = decode(&bytes) {
            check_round_trip(&value)?;
        }
    }

    #[test]
    fn arbitrary_payloads_in_a_valid_frame_never_panic(
        tag in 0u8..8,
        compressed in any::<bool>(),
        payload in payload_bytes(96),
    ) {
        let bytes = if compressed {
            frame(tag, FLAG_COMPRESSED, &zstd::bulk::compress(&payload, 1).unwrap())
        } else {
            frame(tag, 0, &payload)
        };
        match decode(&bytes) {
            Ok(value) => {
                prop_assert_eq!(value.type_tag().as_u8(), tag);
                prop_assert!(value.is_well_formed());
                check_round_trip(&value)?;
            }
            Err(e) => {
                let typed = matches!(
                    e,
                    Error::Payload(_) | Error::UnknownTypeTag(_) | Error::Decompression(_)
                );
                prop_assert!(typed, "unexpected error {:?}", e);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn mutated_golden_envelopes_never_panic(
        which in any::<prop::sample::Index>(),
        mutations in prop::collection::vec(mutation(), 1..6),
        fix_up in any::<bool>(),
    ) {
        let envelopes = golden_envelopes();
        let (name, original) = &envelopes[which.index(envelopes.len())];
        let mut bytes = original.clone();
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        if fix_up && bytes.len() >= HEADER_LEN + TRAILER_LEN {
            // Repair the declared length and the checksum, so the mutation reaches the payload.
            let len = u32::try_from(bytes.len() - HEADER_LEN - TRAILER_LEN).unwrap();
            bytes[7..11].copy_from_slice(&len.to_le_bytes());
            reseal(&mut bytes);
        }
        if let Ok(value) = decode(&bytes) {
            check_round_trip(&value)?;
        }
        if !fix_up && bytes != *original {
            // Unrepaired, any change to the bytes is caught.
            prop_assert!(decode(&bytes).is_err(), "{}: a changed envelope decoded", name);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Round trips of values built from random operations
// ---------------------------------------------------------------------------------------------

const REPLICAS: usize = 3;

#[derive(Clone, Debug)]
struct Step {
    replica: usize,
    ms: u64,
    op: Op,
    /// Which other replicas receive this step's delta (out of order deltas make cloud dots).
    ship: [bool; REPLICAS],
}

fn element() -> impl Strategy<Value = Vec<u8>> {
    prop::sample::select(vec![&b"a"[..], b"b", b"c", b"dd", b""]).prop_map(<[u8]>::to_vec)
}

fn counter_op() -> impl Strategy<Value = CounterOp> {
    prop_oneof![
        (0u64..1000).prop_map(CounterOp::inc),
        (0u64..1000).prop_map(CounterOp::dec)
    ]
}

fn set_op() -> impl Strategy<Value = SetOp> {
    prop_oneof![
        4 => prop::collection::vec(element(), 1..4).prop_map(SetOp::Add),
        2 => prop::collection::vec(element(), 1..3).prop_map(SetOp::Remove),
        1 => Just(SetOp::Clear),
    ]
}

fn register_op() -> impl Strategy<Value = RegisterOp> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..6).prop_map(RegisterOp::Write),
        1 => Just(RegisterOp::Clear),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["x", "y", "z"]).prop_map(str::to_string)
}

fn map_op_with(field: BoxedStrategy<FieldOp>) -> impl Strategy<Value = MapOp> {
    prop_oneof![
        6 => (key(), field).prop_map(|(k, op)| MapOp::update(k, op)),
        1 => key().prop_map(MapOp::remove),
        1 => Just(MapOp::Clear),
    ]
}

fn field_op() -> BoxedStrategy<FieldOp> {
    let leaf = prop_oneof![
        counter_op().prop_map(FieldOp::Counter),
        set_op().prop_map(FieldOp::Set),
        register_op().prop_map(FieldOp::Lww),
        register_op().prop_map(FieldOp::Mv),
    ];
    leaf.prop_recursive(3, 12, 1, |inner| {
        map_op_with(inner).prop_map(|m| FieldOp::Map(Box::new(m)))
    })
    .boxed()
}

fn op_for(tag: TypeTag) -> BoxedStrategy<Op> {
    match tag {
        TypeTag::GCounter => (0u64..1000).prop_map(Op::GCounterInc).boxed(),
        TypeTag::PnCounter => counter_op().prop_map(Op::Counter).boxed(),
        TypeTag::OrSet => set_op().prop_map(Op::Set).boxed(),
        TypeTag::LwwRegister => register_op().prop_map(Op::Lww).boxed(),
        TypeTag::MvRegister => register_op().prop_map(Op::Mv).boxed(),
        TypeTag::Map => map_op_with(field_op()).prop_map(Op::Map).boxed(),
        _ => unreachable!("a new type tag needs an op strategy here"),
    }
}

fn history() -> impl Strategy<Value = (TypeTag, Vec<Step>)> {
    prop::sample::select(TypeTag::ALL.to_vec()).prop_flat_map(|tag| {
        let step = (
            0..REPLICAS,
            0u64..16,
            op_for(tag),
            any::<[bool; REPLICAS]>(),
        )
            .prop_map(|(replica, ms, op, ship)| Step {
                replica,
                ms,
                op,
                ship,
            });
        (Just(tag), prop::collection::vec(step, 0..24))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn values_from_random_operations_round_trip((tag, steps) in history()) {
        let mut replicas = vec![Crdt::empty(tag); REPLICAS];
        for s in &steps {
            let delta = replicas[s.replica]
                .apply(ActorId::new(s.replica as u64 + 1), Hlc::new(s.ms, 0), &s.op)
                .unwrap();
            // Deltas are shipped in envelopes too.
            check_round_trip(&delta)?;
            replicas[s.replica].merge(&delta).unwrap();
            for (i, replica) in replicas.iter_mut().enumerate() {
                if i != s.replica && s.ship[i] {
                    replica.merge(&delta).unwrap();
                }
            }
        }
        for replica in &replicas {
            check_round_trip(replica)?;
        }
        // Equal values, reached by different merge orders, encode to equal bytes.
        let mut forward = replicas[0].clone();
        forward.merge(&replicas[1]).unwrap();
        forward.merge(&replicas[2]).unwrap();
        let mut backward = replicas[2].clone();
        backward.merge(&replicas[1]).unwrap();
        backward.merge(&replicas[0]).unwrap();
        prop_assert_eq!(&forward, &backward);
        prop_assert_eq!(encode(&forward), encode(&backward));
        check_round_trip(&forward)?;
        // And through the zstd path.
        let always = Options { compress_threshold_bytes: 0, ..Options::default() };
        let bytes = envelope::encode(&forward, &always).unwrap();
        prop_assert_eq!(decode(&bytes).unwrap(), forward);
    }
}
