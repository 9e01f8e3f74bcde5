//! The process's own plumbing: signal handling, log output, standard output.

pub mod logging;
pub mod out;
pub mod signals;

/// Implements a trait for `Arc<T>` by forwarding each listed method to `T`,
/// so a function taking `&impl Trait` accepts an `&Arc<_>` as well.
macro_rules! forward_to_arc {
    ($($name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        $(fn $name(&self $(, $arg: $ty)*) -> $ret {
            (**self).$name($($arg),*)
        })*
    };
}
pub(crate) use forward_to_arc;

/// Wall-clock time now, in Unix milliseconds (0 before 1970).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
