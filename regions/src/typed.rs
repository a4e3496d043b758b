//! Typed views of stored values: what `Region::read::<T>` can return.

use geostate_crdt::{Crdt, GCounter, LwwRegister, MvRegister, OrMap, OrSet, PnCounter, TypeTag};

use crate::RegionError;

/// A type a stored value can be read as.
///
/// ```
/// use geostate_crdt::{Crdt, OrSet, TypeTag};
/// use geostate_regions::FromCrdt;
/// let set = <OrSet<String> as FromCrdt>::from_crdt("k", Crdt::empty(TypeTag::OrSet)).unwrap();
/// assert!(set.is_empty());
/// assert!(<OrSet<String> as FromCrdt>::from_crdt("k", Crdt::empty(TypeTag::PnCounter)).is_err());
/// ```
pub trait FromCrdt: Sized {
    /// The stored type this reads.
    const TYPE_TAG: TypeTag;

    /// Converts a stored value; another type is [`RegionError::TypeMismatch`].
    fn from_crdt(key: &str, value: Crdt) -> Result<Self, RegionError>;

    /// The value of a key that holds nothing.
    fn empty(key: &str) -> Result<Self, RegionError> {
        Self::from_crdt(key, Crdt::empty(Self::TYPE_TAG))
    }
}

fn mismatch(key: &str, expected: TypeTag, value: &Crdt) -> RegionError {
    RegionError::TypeMismatch {
        key: key.to_string(),
        expected,
        found: value.type_tag(),
    }
}

fn utf8(key: &str) -> impl Fn(&Vec<u8>) -> Result<String, RegionError> + '_ {
    move |bytes| {
        String::from_utf8(bytes.clone()).map_err(|e| RegionError::Conversion {
            key: key.to_string(),
            reason: format!("stored bytes are not UTF-8: {e}"),
        })
    }
}

macro_rules! direct {
    ($($ty:ty => $variant:ident),* $(,)?) => {$(
        impl FromCrdt for $ty {
            const TYPE_TAG: TypeTag = TypeTag::$variant;

            fn from_crdt(key: &str, value: Crdt) -> Result<Self, RegionError> {
                match value {
                    Crdt::$variant(v) => Ok(v),
                    other => Err(mismatch(key, Self::TYPE_TAG, &other)),
                }
            }
        }
    )*};
}

direct! {
    GCounter => GCounter,
    PnCounter => PnCounter,
    OrSet<Vec<u8>> => OrSet,
    LwwRegister<Vec<u8>> => LwwRegister,
    MvRegister<Vec<u8>> => MvRegister,
    OrMap => Map,
}

macro_rules! text {
    ($($ty:ident => $variant:ident),* $(,)?) => {$(
        impl FromCrdt for $ty<String> {
            const TYPE_TAG: TypeTag = TypeTag::$variant;

            fn from_crdt(key: &str, value: Crdt) -> Result<Self, RegionError> {
                match value {
                    Crdt::$variant(v) => v.try_map(utf8(key)),
                    other => Err(mismatch(key, Self::TYPE_TAG, &other)),
                }
            }
        }
    )*};
}

text! {
    OrSet => OrSet,
    LwwRegister => LwwRegister,
    MvRegister => MvRegister,
}
