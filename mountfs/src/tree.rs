//! What the mount shows and how inodes name it: the root, one folder per restorable version,
//! `disk.img` and `partN.img` in each, and the `latest` symlink. The catalogue of versions comes
//! from a repository scan (headers, footers and indexes checked) and is refreshed when the
//! repository folder changes, so a version made while mounted appears without remounting.
//! Version readers (8 bytes per source block each) are opened on first use and kept in a small
//! LRU, so memory does not grow with the number of versions.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lru::LruCache;
use strata_format::{ImageFile, Repository, VersionReader};

use crate::MountError;
use strata_format::frame_cache::FrameCache;
use strata_format::read_plan::read_window;
use strata_format::volume::partitions::{find_partitions, Partition};
use strata_format::volume::DiskRead;

/// Inode of a node of the tree. Version folders and files use `id << 8 | k`: k = 0 the folder,
/// 1 disk.img, 1 + N partN.img.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Root,
    Latest,
    VersionDir(u64),
    Disk(u64),
    Part(u64, u32),
}

pub const ROOT_INO: u64 = 1;
const LATEST_INO: u64 = 2;

impl Node {
    pub fn ino(self) -> u64 {
        match self {
            Node::Root => ROOT_INO,
            Node::Latest => LATEST_INO,
            Node::VersionDir(id) => id << 8,
            Node::Disk(id) => (id << 8) | 1,
            Node::Part(id, n) => (id << 8) | (1 + u64::from(n)),
        }
    }

    pub fn from_ino(ino: u64) -> Option<Node> {
        match ino {
            ROOT_INO => Some(Node::Root),
            LATEST_INO => Some(Node::Latest),
            _ if ino < 256 => None,
            _ => {
                let (id, k) = (ino >> 8, (ino & 0xff) as u32);
                Some(match k {
                    0 => Node::VersionDir(id),
                    1 => Node::Disk(id),
                    n => Node::Part(id, n - 1),
                })
            }
        }
    }
}

/// A restorable version as the mount shows it.
pub struct VersionInfo {
    pub id: u64,
    pub created: SystemTime,
    pub source_size: u64,
    pub block_size: u32,
    pub present_blocks: u64,
    chain: Vec<Arc<ImageFile>>,
    partitions: OnceLock<Vec<Partition>>,
}

struct Listing {
    versions: BTreeMap<u64, Arc<VersionInfo>>,
    dir_mtime: Option<SystemTime>,
    checked: Instant,
}

pub struct Catalogue {
    repo: Repository,
    only: Option<u64>,
    listing: RwLock<Listing>,
    /// Open readers by (version id, image id of the version's image).
    readers: Mutex<LruCache<(u64, strata_format::header::Id128), Arc<VersionReader>>>,
    refresh_lock: Mutex<()>,
}

/// How often at most the repository folder is looked at for new versions.
const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Version readers kept open.
const OPEN_READERS: usize = 8;

fn dir_mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Catalogue {
    /// Scans the repository. Versions that are not restorable are left out with a warning.
    /// With `only`, shows just that version (which must be restorable).
    pub fn load(repo_path: &Path, only: Option<u64>) -> Result<Catalogue, MountError> {
        let repo = Repository::open(repo_path)?;
        let cat = Catalogue {
            repo,
            only,
            listing: RwLock::new(Listing { versions: BTreeMap::new(), dir_mtime: None, checked: Instant::now() }),
            readers: Mutex::new(LruCache::new(NonZeroUsize::new(OPEN_READERS).expect("nonzero"))),
            refresh_lock: Mutex::new(()),
        };
        let listing = cat.scan(true)?;
        if let Some(id) = only {
            if !listing.versions.contains_key(&id) {
                return Err(MountError::Invalid(format!(
                    "{}: version {id} is not there or not restorable (`strata list` says why)",
                    repo_path.display()
                )));
            }
        }
        *cat.listing.write().unwrap() = listing;
        Ok(cat)
    }

    fn scan(&self, warn: bool) -> Result<Listing, MountError> {
        let dir_mtime = dir_mtime(self.repo.path());
        let mut state = self.repo.scan()?;
        state.check_indexes();
        let mut versions = BTreeMap::new();
        for status in state.statuses() {
            if self.only.is_some_and(|o| o != status.id) {
                continue;
            }
            if let Some(problem) = &status.problem {
                if warn {
                    log::warn!("version {} is not restorable and is not shown: {problem}", status.id);
                }
                continue;
            }
            let (Some(image), Ok(chain)) = (status.image.clone(), state.chain(status.id)) else { continue };
            let h = &image.header;
            versions.insert(
                status.id,
                Arc::new(VersionInfo {
                    id: status.id,
                    created: UNIX_EPOCH + Duration::new(h.created_secs.max(0) as u64, h.created_nanos),
                    source_size: h.source_size,
                    block_size: h.block_size,
                    present_blocks: image.footer.present_blocks,
                    chain,
                    partitions: OnceLock::new(),
                }),
            );
        }
        Ok(Listing { versions, dir_mtime, checked: Instant::now() })
    }

    /// Rescans when the repository folder changed since the last look (at most once a second).
    pub fn refresh_if_changed(&self) {
        if self.only.is_some() {
            return;
        }
        {
            let l = self.listing.read().unwrap();
            if l.checked.elapsed() < REFRESH_INTERVAL {
                return;
            }
        }
        let Ok(_guard) = self.refresh_lock.try_lock() else { return };
        let now_mtime = dir_mtime(self.repo.path());
        {
            let mut l = self.listing.write().unwrap();
            if l.dir_mtime == now_mtime && now_mtime.is_some() {
                l.checked = Instant::now();
                return;
            }
        }
        match self.scan(false) {
            Ok(mut fresh) => {
                let mut l = self.listing.write().unwrap();
                // Keep the already-built info (and partition lists) of versions still there.
                for (id, info) in fresh.versions.iter_mut() {
                    let top_id = |v: &VersionInfo| v.chain.last().map(|i| i.header.image_id);
                    if let Some(old) = l.versions.get(id).filter(|old| top_id(old) == top_id(info)) {
                        *info = old.clone();
                    }
                }
                for id in fresh.versions.keys().filter(|id| !l.versions.contains_key(id)) {
                    log::info!("version {id} appeared in {}", self.repo.path().display());
                }
                *l = fresh;
            }
            Err(e) => log::warn!("rescanning {}: {e}", self.repo.path().display()),
        }
    }

    /// The repository's block size (every version's).
    pub fn block_size(&self) -> u32 {
        self.repo.block_size
    }

    pub fn versions(&self) -> Vec<Arc<VersionInfo>> {
        self.listing.read().unwrap().versions.values().cloned().collect()
    }

    pub fn version(&self, id: u64) -> Option<Arc<VersionInfo>> {
        self.listing.read().unwrap().versions.get(&id).cloned()
    }

    pub fn latest(&self) -> Option<u64> {
        self.listing.read().unwrap().versions.keys().next_back().copied()
    }

    /// The reader of a version, opened (index streamed, block map built) on first use.
    pub fn reader(&self, info: &VersionInfo) -> Result<Arc<VersionReader>, MountError> {
        let key = (info.id, info.chain[info.chain.len() - 1].header.image_id);
        if let Some(r) = self.readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key) {
            return Ok(r.clone());
        }
        let reader = Arc::new(VersionReader::from_chain(info.chain.clone())?);
        self.readers.lock().unwrap_or_else(std::sync::PoisonError::into_inner).put(key, reader.clone());
        Ok(reader)
    }

    /// The partitions of a version's disk (read once, through the block cache).
    pub fn partitions(&self, info: &VersionInfo, cache: &FrameCache) -> Vec<Partition> {
        if let Some(p) = info.partitions.get() {
            return p.clone();
        }
        let parts = match self.reader(info) {
            Ok(reader) => find_partitions(&CachedDisk { reader: &reader, cache }, info.source_size),
            Err(e) => {
                log::warn!("version {}: cannot read its partition table: {e}", info.id);
                return Vec::new();
            }
        };
        info.partitions.get_or_init(|| parts).clone()
    }
}

/// A version's disk read through the block cache.
pub struct CachedDisk<'a> {
    pub reader: &'a VersionReader,
    pub cache: &'a FrameCache,
}

impl DiskRead for CachedDisk<'_> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        read_window(self.reader, self.cache, 0, self.reader.source_size(), offset, buf, false)
            .map_err(std::io::Error::other)
    }
}
