//! Byte ranges inside a device, with every bound checked.
//!
//! A request names `offset` and `length`; both come from a peer and must never be
//! trusted. [`Extent::within`] is the single place that decides whether a range
//! lies inside a device of a given size, with overflow of `offset + length`
//! treated as "outside" rather than wrapping.

/// A half-open byte range `[offset, offset + length)` known not to overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

/// Why a range was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("range at offset {offset} with length {length} overflows 64 bits")]
    Overflow { offset: u64, length: u64 },
    #[error("range [{offset}, {offset}+{length}) ends past the device size {size}")]
    OutOfBounds { offset: u64, length: u64, size: u64 },
}

impl Extent {
    /// Checks that `[offset, offset + length)` lies inside a device of `size` bytes.
    pub fn within(offset: u64, length: u64, size: u64) -> Result<Extent, RangeError> {
        let end = offset
            .checked_add(length)
            .ok_or(RangeError::Overflow { offset, length })?;
        if end > size {
            return Err(RangeError::OutOfBounds {
                offset,
                length,
                size,
            });
        }
        Ok(Extent { offset, length })
    }

    pub const fn end(&self) -> u64 {
        self.offset + self.length
    }

    pub const fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// The part of `self` that also lies in `other`, if any.
    pub fn intersect(&self, other: &Extent) -> Option<Extent> {
        let start = self.offset.max(other.offset);
        let end = self.end().min(other.end());
        (start < end).then(|| Extent {
            offset: start,
            length: end - start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bounds() {
        assert!(Extent::within(0, 10, 10).is_ok());
        assert!(Extent::within(10, 0, 10).is_ok());
        assert_eq!(
            Extent::within(5, 6, 10),
            Err(RangeError::OutOfBounds {
                offset: 5,
                length: 6,
                size: 10
            })
        );
        assert_eq!(
            Extent::within(u64::MAX, 2, u64::MAX),
            Err(RangeError::Overflow {
                offset: u64::MAX,
                length: 2
            })
        );
    }

    proptest! {
        #[test]
        fn accepted_ranges_are_inside(offset in any::<u64>(), length in any::<u64>(), size in any::<u64>()) {
            if let Ok(e) = Extent::within(offset, length, size) {
                prop_assert!(e.offset.checked_add(e.length).is_some());
                prop_assert!(e.end() <= size);
            } else {
                prop_assert!(offset.checked_add(length).is_none_or(|end| end > size));
            }
        }

        #[test]
        fn intersection_is_inside_both(a in 0u64..1000, al in 0u64..1000, b in 0u64..1000, bl in 0u64..1000) {
            let x = Extent { offset: a, length: al };
            let y = Extent { offset: b, length: bl };
            if let Some(i) = x.intersect(&y) {
                prop_assert!(i.offset >= x.offset && i.end() <= x.end());
                prop_assert!(i.offset >= y.offset && i.end() <= y.end());
                prop_assert!(i.length > 0);
            }
        }
    }
}
