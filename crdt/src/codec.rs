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

/// Deepest nesting of sequences, maps, structs, options and enums accepted while decoding.
///
/// Decoding recurses once per level, so without a bound a few hundred kilobytes of hostile
/// payload (a map nested in a map, ten thousand times) overflow the stack and abort the
/// process. A map value nested `n` levels deep (see [`crate::envelope::MAP_NESTING_MAX`])
/// needs at most `2 n + 6` levels here, so every value the envelope accepts fits.
pub(crate) const NESTING_MAX: usize = 2 * crate::envelope::MAP_NESTING_MAX + 32;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_BYTES_MAX>()
}

/// Encodes `value` to bytes. Deterministic: equal values give equal bytes.
pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| Error::Payload(e.to_string()))
}

/// The length of `encode(value)`, computed without allocating the bytes.
pub(crate) fn encoded_len<T: Serialize>(value: &T) -> Result<usize, Error> {
    struct Counter(usize);
    impl bincode::enc::write::Writer for Counter {
        fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
            self.0 += bytes.len();
            Ok(())
        }
    }
    let mut counter = Counter(0);
    bincode::serde::encode_into_writer(value, &mut counter, config())
        .map_err(|e| Error::Payload(e.to_string()))?;
    Ok(counter.0)
}

/// Decodes exactly `bytes` as a `T`; trailing bytes are an error. Nesting deeper than
/// [`NESTING_MAX`] is an error too, reported before the stack can overflow.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let seed = depth::Limited::<T>::new(NESTING_MAX);
    let (value, read) = bincode::serde::seed_decode_from_slice(seed, bytes, config())
        .map_err(|e| Error::Payload(e.to_string()))?;
    if read != bytes.len() {
        return Err(Error::Payload(format!(
            "{} bytes left after the value",
            bytes.len() - read
        )));
    }
    Ok(value)
}

/// A `serde` deserializer adapter that bounds nesting depth.
///
/// Every wrapper carries the number of levels still allowed; entering a sequence, map, enum,
/// option or newtype costs one, and running out is a decode error instead of a stack overflow.
/// The adapter forwards everything else unchanged, so the bytes accepted are exactly those the
/// wrapped deserializer accepts, minus the too-deep ones.
mod depth {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{
        self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess,
        Visitor,
    };

    fn too_deep<E: de::Error>() -> E {
        E::custom(format_args!(
            "value nested more than {} levels deep",
            super::NESTING_MAX
        ))
    }

    /// A seed deserializing a `T` through a depth-limited deserializer.
    pub(super) struct Limited<T> {
        remaining: usize,
        marker: PhantomData<fn() -> T>,
    }

    impl<T> Limited<T> {
        pub(super) fn new(remaining: usize) -> Self {
            Self {
                remaining,
                marker: PhantomData,
            }
        }
    }

    impl<'de, T: de::Deserialize<'de>> DeserializeSeed<'de> for Limited<T> {
        type Value = T;

        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
            T::deserialize(Depth {
                inner: deserializer,
                remaining: self.remaining,
            })
        }
    }

    /// A deserializer allowed `remaining` more levels.
    struct Depth<D> {
        inner: D,
        remaining: usize,
    }

    /// A visitor, seed or access object allowed `remaining` more levels.
    struct Wrap<X> {
        inner: X,
        remaining: usize,
    }

    impl<X> Wrap<X> {
        fn new(inner: X, remaining: usize) -> Self {
            Self { inner, remaining }
        }
    }

    macro_rules! forward_deserialize {
        ($($method:ident($($arg:ident: $ty:ty),*);)*) => {$(
            fn $method<V: Visitor<'de>>(
                self,
                $($arg: $ty,)*
                visitor: V,
            ) -> Result<V::Value, Self::Error> {
                self.inner.$method($($arg,)* Wrap::new(visitor, self.remaining))
            }
        )*};
    }

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for Depth<D> {
        type Error = D::Error;

        forward_deserialize! {
            deserialize_any();
            deserialize_bool();
            deserialize_i8();
            deserialize_i16();
            deserialize_i32();
            deserialize_i64();
            deserialize_i128();
            deserialize_u8();
            deserialize_u16();
            deserialize_u32();
            deserialize_u64();
            deserialize_u128();
            deserialize_f32();
            deserialize_f64();
            deserialize_char();
            deserialize_str();
            deserialize_string();
            deserialize_bytes();
            deserialize_byte_buf();
            deserialize_option();
            deserialize_unit();
            deserialize_unit_struct(name: &'static str);
            deserialize_newtype_struct(name: &'static str);
            deserialize_seq();
            deserialize_tuple(len: usize);
            deserialize_tuple_struct(name: &'static str, len: usize);
            deserialize_map();
            deserialize_struct(name: &'static str, fields: &'static [&'static str]);
            deserialize_enum(name: &'static str, variants: &'static [&'static str]);
            deserialize_identifier();
            deserialize_ignored_any();
        }

        fn is_human_readable(&self) -> bool {
            self.inner.is_human_readable()
        }
    }

    macro_rules! forward_visit {
        ($($method:ident($ty:ty);)*) => {$(
            fn $method<E: de::Error>(self, v: $ty) -> Result<Self::Value, E> {
                self.inner.$method(v)
            }
        )*};
    }

    impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.inner.expecting(f)
        }

        forward_visit! {
            visit_bool(bool);
            visit_i8(i8);
            visit_i16(i16);
            visit_i32(i32);
            visit_i64(i64);
            visit_i128(i128);
            visit_u8(u8);
            visit_u16(u16);
            visit_u32(u32);
            visit_u64(u64);
            visit_u128(u128);
            visit_f32(f32);
            visit_f64(f64);
            visit_char(char);
            visit_str(&str);
            visit_borrowed_str(&'de str);
            visit_string(String);
            visit_bytes(&[u8]);
            visit_borrowed_bytes(&'de [u8]);
            visit_byte_buf(Vec<u8>);
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            self.inner.visit_none()
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            self.inner.visit_unit()
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            let remaining = self.remaining.checked_sub(1).ok_or_else(too_deep)?;
            self.inner.visit_some(Depth {
                inner: d,
                remaining,
            })
        }

        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            let remaining = self.remaining.checked_sub(1).ok_or_else(too_deep)?;
            self.inner.visit_newtype_struct(Depth {
                inner: d,
                remaining,
            })
        }

        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            let remaining = self.remaining.checked_sub(1).ok_or_else(too_deep)?;
            self.inner.visit_seq(Wrap::new(seq, remaining))
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            let remaining = self.remaining.checked_sub(1).ok_or_else(too_deep)?;
            self.inner.visit_map(Wrap::new(map, remaining))
        }

        fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
            let remaining = self.remaining.checked_sub(1).ok_or_else(too_deep)?;
            self.inner.visit_enum(Wrap::new(data, remaining))
        }
    }

    impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Wrap<S> {
        type Value = S::Value;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
            self.inner.deserialize(Depth {
                inner: d,
                remaining: self.remaining,
            })
        }
    }

    impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Wrap<A> {
        type Error = A::Error;

        fn next_element_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<Option<T::Value>, A::Error> {
            self.inner
                .next_element_seed(Wrap::new(seed, self.remaining))
        }

        fn size_hint(&self) -> Option<usize> {
            self.inner.size_hint()
        }
    }

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for Wrap<A> {
        type Error = A::Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, A::Error> {
            self.inner.next_key_seed(Wrap::new(seed, self.remaining))
        }

        fn next_value_seed<V: DeserializeSeed<'de>>(
            &mut self,
            seed: V,
        ) -> Result<V::Value, A::Error> {
            self.inner.next_value_seed(Wrap::new(seed, self.remaining))
        }

        fn size_hint(&self) -> Option<usize> {
            self.inner.size_hint()
        }
    }

    impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Wrap<A> {
        type Error = A::Error;
        type Variant = Wrap<A::Variant>;

        fn variant_seed<V: DeserializeSeed<'de>>(
            self,
            seed: V,
        ) -> Result<(V::Value, Self::Variant), A::Error> {
            let remaining = self.remaining;
            let (value, variant) = self.inner.variant_seed(Wrap::new(seed, remaining))?;
            Ok((value, Wrap::new(variant, remaining)))
        }
    }

    impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Wrap<A> {
        type Error = A::Error;

        fn unit_variant(self) -> Result<(), A::Error> {
            self.inner.unit_variant()
        }

        fn newtype_variant_seed<T: DeserializeSeed<'de>>(
            self,
            seed: T,
        ) -> Result<T::Value, A::Error> {
            self.inner
                .newtype_variant_seed(Wrap::new(seed, self.remaining))
        }

        fn tuple_variant<V: Visitor<'de>>(
            self,
            len: usize,
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            self.inner
                .tuple_variant(len, Wrap::new(visitor, self.remaining))
        }

        fn struct_variant<V: Visitor<'de>>(
            self,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, A::Error> {
            self.inner
                .struct_variant(fields, Wrap::new(visitor, self.remaining))
        }
    }
}

/// The version byte in front of every record (see [`crate::record`]).
pub(crate) const RECORD_FORMAT_VERSION: u8 = 1;
