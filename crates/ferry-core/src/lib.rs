//! ferry-core: the pure, deterministic heart of ferry.
//!
//! Nothing in this crate touches a socket, a file or a clock. Everything here is
//! driven by values passed in and returns values out, so it can be unit-tested,
//! property-tested and (for the state machines that later issues add: link,
//! resync, cluster roles, migration phases) simulated deterministically.
//!
//! Today it holds the geometry every other layer agrees on:
//! - [`size`]: byte sizes as operators write them (`10GiB`, `512k`) and as we print them;
//! - [`extent`]: checked byte ranges inside a device, and the bounds rules that
//!   protect a volume from requests that fall outside it.
//!
//! and the state machines: [`dirty`] maps, [`generation`] histories, the
//! [`link`] replicator, the [`migration`] lifecycle, [`schedule`]d
//! cutovers and maintenance windows, and the [`snapshot`] and overlay
//! block maps of test cutovers, and the migration estimator ([`estimate`]:
//! working-set sketches and forecasts).

pub mod archive;
pub mod audit;
pub mod blockobs;
pub mod cluster;
pub mod crc32c;
pub mod delta;
pub mod dirty;
pub mod estimate;
pub mod extent;
pub mod generation;
pub mod handover;
pub mod history;
pub mod link;
pub mod merkle;
pub mod migration;
pub mod name;
pub mod schedule;
pub mod size;
pub mod snapshot;
pub mod split_brain;

pub use dirty::{DirtyMap, DirtyMapError};
pub use extent::{Extent, RangeError};
pub use generation::{GenerationHistory, Relation};
pub use link::{LinkConfig, Mode, Phase, ReplicaState, Replicator, WriteDecision};
pub use migration::{Migration, MigrationPhase};
pub use name::{Name, NameError};
pub use size::{ByteSize, SizeParseError};
