//! An archive's manifest (what it holds and how to check it) and an
//! interrupted create's progress record. Both are store records
//! (`crate::store`: checksummed envelope, atomic 0600 writes).

use ferry_core::archive::ChunkId;
use ferry_core::Name;
use serde::{Deserialize, Serialize};

/// What an archive was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// A ferry volume, taken live at a flush barrier.
    Volume,
    /// All of a workload's volumes at one barrier (and its shares).
    Workload,
    /// A ferry share (file-level).
    Share,
    /// An image file ferry does not serve.
    Image,
    /// A block device ferry does not serve.
    Device,
    /// A live root tree of a server ferry does not run on (P2V).
    Tree,
}

impl SourceKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            SourceKind::Volume => "volume",
            SourceKind::Workload => "workload",
            SourceKind::Share => "share",
            SourceKind::Image => "image",
            SourceKind::Device => "device",
            SourceKind::Tree => "tree",
        }
    }
}

/// What the archive's contents are consistent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// Every disk at one flush barrier of its stream: every write
    /// acknowledged before it, none after.
    FlushBarrier,
    /// A file or device read while it may have been written: crash-consistent
    /// only if nothing wrote it during the copy.
    CrashConsistentIfIdle,
    /// Files copied while a watcher caught changes, then a final pass: each
    /// file as of its last copy.
    FileLevel,
}

/// Where the archive came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub kind: SourceKind,
    /// The volume, workload or share name, or the file's or device's path.
    pub name: String,
    /// The node that took it.
    pub node: String,
}

/// One disk (a volume, an image, a device) in an archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The volume's name, or the file's name.
    pub name: String,
    /// The volume's id (a restored volume keeps it: replication knows it).
    #[serde(default)]
    pub volume_id: Option<String>,
    pub size_bytes: u64,
    /// Merkle root (hex) over `leaf_bytes` leaves: the root replication's
    /// verify computes of the same bytes.
    pub merkle_root: String,
    /// The generation minted at the barrier (offline seeding), hex.
    #[serde(default)]
    pub generation: Option<String>,
    /// Chunk ids in order; `null`: all zeroes (a hole), not stored.
    pub chunks: Vec<Option<ChunkId>>,
}

/// The kind of a file-level entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// One file, directory or symlink of a file-level archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative to the tree's root, `/`-separated, no `.`/`..` parts.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits (and setuid/setgid/sticky).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_unix_ns: i64,
    #[serde(default)]
    pub size_bytes: u64,
    /// A symlink's target.
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub chunks: Vec<Option<ChunkId>>,
}

/// A file-level tree (a share, a captured root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub name: String,
    pub entries: Vec<Entry>,
}

/// What a create wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateStats {
    /// Bytes of the source read (holes are not read).
    pub read_bytes: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    /// Chunks this create added to the store, and their bytes on disk.
    pub new_chunks: u64,
    pub new_stored_bytes: u64,
    /// Raw bytes of the chunks it added (before compression).
    pub new_raw_bytes: u64,
    pub elapsed_ms: u64,
}

/// An archive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: Name,
    pub created_unix_ms: u64,
    pub source: Source,
    pub consistency: Consistency,
    pub chunk_bytes: u64,
    pub leaf_bytes: u64,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default)]
    pub trees: Vec<Tree>,
    /// The workload's definition (hooks, VIP, VM spec), as the agent keeps it.
    #[serde(default)]
    pub workload: Option<serde_json::Value>,
    #[serde(default)]
    pub stats: CreateStats,
}

impl crate::store::Record for Manifest {
    const KIND: &'static str = "archive-manifest";
}

impl Manifest {
    /// Every chunk it names.
    pub fn chunk_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        let disks = self
            .disks
            .iter()
            .flat_map(|d| d.chunks.iter().flatten().copied());
        let trees = self.trees.iter().flat_map(|t| {
            t.entries
                .iter()
                .flat_map(|e| e.chunks.iter().flatten().copied())
        });
        disks.chain(trees)
    }

    /// Total bytes of its disks and files.
    pub fn size_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.size_bytes).sum::<u64>()
            + self
                .trees
                .iter()
                .flat_map(|t| t.entries.iter().map(|e| e.size_bytes))
                .sum::<u64>()
    }
}

/// An interrupted create's progress: the chunks done so far, durable (the
/// store was synced before this was written). A create of the same name
/// and source resumes after them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partial {
    pub name: Name,
    /// What identifies the source unchanged (kind, path, size, and for a file
    /// its inode and mtime); another key starts over.
    pub source_key: String,
    pub chunk_bytes: u64,
    pub leaf_bytes: u64,
    /// Per disk, the chunks of its done prefix.
    pub disks: Vec<Vec<Option<ChunkId>>>,
    /// Chunks of files copied so far (file-level creates).
    #[serde(default)]
    pub files: Vec<ChunkId>,
    pub updated_unix_ms: u64,
}

impl crate::store::Record for Partial {
    const KIND: &'static str = "archive-partial";
}

impl Partial {
    pub fn chunk_ids(&self) -> impl Iterator<Item = ChunkId> + '_ {
        self.disks
            .iter()
            .flat_map(|d| d.iter().flatten().copied())
            .chain(self.files.iter().copied())
    }
}
