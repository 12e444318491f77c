//! A repository folder: its identity file, the image files in it, the backup lock, version ids,
//! leftovers of interrupted backups, and the health of every version (which chain it needs and
//! whether every member of that chain is present and sound).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{FormatError, Loc, Result};
use crate::header::{check_block_size, hex_id, new_id, Id128, Kind};
use crate::image::{sync_dir, ImageFile};
use crate::layout::{self, IMAGE_SUFFIX, LOCK_FILE, REPO_FILE, TEMP_PREFIX};
use crate::version::VersionReader;

#[derive(Debug, Clone)]
pub struct Repository {
    path: PathBuf,
    pub repo_id: Id128,
    pub block_size: u32,
    /// Highest version id ever published here (ids are never reused).
    pub last_version: u64,
    /// The newest full read from the source (not a merge): (version id, creation seconds);
    /// what "a full every N backups / D days" counts from, whatever merges and prunes did since.
    pub last_source_full: Option<(u64, i64)>,
}

/// An exclusive hold on the repository for writing; released on drop.
#[derive(Debug)]
pub struct RepoLock {
    _file: File,
}

pub fn image_file_name(id: u64) -> String {
    format!("v{id:08}{IMAGE_SUFFIX}")
}

/// Threads that open images side by side: opening reads a header and a footer, two waits each
/// on a cold disk, which a long chain's hundreds of images would otherwise take one by one.
const OPEN_THREADS: usize = 8;

/// Opens the images at `found`, in order, on up to `OPEN_THREADS` threads.
fn open_images(found: &[(u64, PathBuf)]) -> Vec<Result<ImageFile>> {
    let threads = OPEN_THREADS.min(found.len() / 4).max(1);
    if threads == 1 {
        return found.iter().map(|(_, path)| ImageFile::open(path)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut opened: Vec<(usize, Result<ImageFile>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((_, path)) = found.get(i) else { return mine };
                        mine.push((i, ImageFile::open(path)));
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().expect("image opening thread")).collect()
    });
    opened.sort_unstable_by_key(|(i, _)| *i);
    opened.into_iter().map(|(_, image)| image).collect()
}

/// The version id in an image file name, if it is one.
pub fn parse_image_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix('v')?.strip_suffix(IMAGE_SUFFIX)?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&id| id > 0 && id <= MAX_VERSION_ID)
}

/// Highest version id (11 digits: a backup a second for over 3000 years).
pub const MAX_VERSION_ID: u64 = 99_999_999_999;

impl Repository {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn image_path(&self, id: u64) -> PathBuf {
        self.path.join(image_file_name(id))
    }

    /// A temporary name for the image of version `id` while it is written.
    pub fn temp_image_path(&self, id: u64) -> PathBuf {
        self.path.join(format!("{TEMP_PREFIX}{}.{}", image_file_name(id), std::process::id()))
    }

    /// Creates a new repository at `path` (the folder may exist but must not hold one).
    pub fn create(path: &Path, block_size: u32) -> Result<Repository> {
        check_block_size(block_size)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| FormatError::io(Loc::file(path), "create repository folder", e))?;
        if path.join(REPO_FILE).exists() {
            return Err(FormatError::Invalid(format!("{}: a repository already exists here", path.display())));
        }
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| FormatError::io(Loc::file(path), "make the repository folder private (0700)", e))?;
        let repo = Repository {
            path: path.to_path_buf(),
            repo_id: new_id(),
            block_size,
            last_version: 0,
            last_source_full: None,
        };
        repo.write_identity()?;
        Ok(repo)
    }

    /// Opens the repository at `path`.
    pub fn open(path: &Path) -> Result<Repository> {
        let not_repo = |detail: String| FormatError::NotARepository { path: path.to_path_buf(), detail };
        if !path.is_dir() {
            return Err(not_repo(if path.exists() { "not a folder".into() } else { "no such folder".into() }));
        }
        let id_path = path.join(REPO_FILE);
        let text = match std::fs::read_to_string(&id_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(not_repo(format!("no {REPO_FILE} file")));
            }
            Err(e) => return Err(FormatError::io(Loc::file(&id_path), "read", e)),
        };
        let identity = Identity::parse(&text).map_err(|detail| not_repo(format!("{REPO_FILE}: {detail}")))?;
        Ok(Repository {
            path: path.to_path_buf(),
            repo_id: identity.repo_id,
            block_size: identity.block_size,
            last_version: identity.last_version,
            last_source_full: identity.last_source_full,
        })
    }

    /// Writes the identity file durably (temporary name, fsync, rename, fsync folder).
    fn write_identity(&self) -> Result<()> {
        let mut text = format!(
            "# strata repository identity. Written by strata; do not edit.\n\
             format = {}\nrepo_id = \"{}\"\nblock_size = {}\nlast_version = {}\n",
            layout::FORMAT_VERSION,
            hex_id(&self.repo_id),
            self.block_size,
            self.last_version
        );
        if let Some((id, secs)) = self.last_source_full {
            text += &format!("last_source_full = {id}\nlast_source_full_time = {secs}\n");
        }
        let temp = self.path.join(format!("{TEMP_PREFIX}{REPO_FILE}.{}", std::process::id()));
        let loc = Loc::file(&temp);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| FormatError::io(loc.clone(), "create", e))?;
        let written = f.write_all(text.as_bytes()).and_then(|_| f.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(FormatError::io(loc, "write", e));
        }
        crate::fault::step(crate::fault::Step::Fsync);
        std::fs::rename(&temp, self.path.join(REPO_FILE)).map_err(|e| FormatError::io(loc, "rename into place", e))?;
        crate::fault::step(crate::fault::Step::Rename);
        sync_dir(&self.path)
    }

    /// Records that `id` is about to be published, so that it is never handed out again;
    /// `source_full_time` is the creation time when it is a full read from the source.
    pub fn record_published(&mut self, _lock: &RepoLock, id: u64, source_full_time: Option<i64>) -> Result<()> {
        if let Some(secs) = source_full_time {
            self.last_source_full = Some((id, secs));
        }
        if id > self.last_version || source_full_time.is_some() {
            self.last_version = self.last_version.max(id);
            crate::fault::point("repo.before_record");
            self.write_identity()?;
        }
        Ok(())
    }

    /// Takes the repository's write lock, or fails at once if another process holds it.
    pub fn lock(&self) -> Result<RepoLock> {
        let path = self.path.join(LOCK_FILE);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| FormatError::io(Loc::file(&path), "open lock file", e))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(FormatError::Busy { path: self.path.clone() });
            }
            return Err(FormatError::io(Loc::file(&path), "lock", err));
        }
        Ok(RepoLock { _file: file })
    }

    /// Removes what interrupted backups left behind (temporary images). Needs the lock.
    pub fn remove_leftovers(&self, _lock: &RepoLock) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for entry in self.read_dir()? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX) {
                let p = entry.path();
                std::fs::remove_file(&p).map_err(|e| FormatError::io(Loc::file(&p), "remove leftover", e))?;
                crate::fault::step(crate::fault::Step::Delete);
                removed.push(p);
            }
        }
        if !removed.is_empty() {
            sync_dir(&self.path)?;
        }
        Ok(removed)
    }

    fn read_dir(&self) -> Result<Vec<std::fs::DirEntry>> {
        let loc = Loc::file(&self.path);
        let entries = std::fs::read_dir(&self.path).map_err(|e| FormatError::io(loc.clone(), "list", e))?;
        entries.collect::<std::io::Result<Vec<_>>>().map_err(|e| FormatError::io(loc, "list", e))
    }

    /// Opens every image file and works out the health of every version. Reads headers and
    /// footers only; `RepoState::check_indexes` reads the indexes too.
    pub fn scan(&self) -> Result<RepoState> {
        let found: Vec<(u64, PathBuf)> = self
            .read_dir()?
            .into_iter()
            .filter_map(|e| parse_image_file_name(&e.file_name().to_string_lossy()).map(|id| (id, e.path())))
            .collect();
        let opened = open_images(&found);
        let images = found
            .into_iter()
            .zip(opened)
            .map(|((id, path), image)| {
                let image = image.map_err(|e| e.to_string()).and_then(|img| self.belongs(id, img));
                (id, Slot { path, image: image.map(Arc::new) })
            })
            .collect();
        Ok(RepoState { repo: self.clone(), images })
    }

    fn belongs(&self, id: u64, image: ImageFile) -> std::result::Result<ImageFile, String> {
        let h = &image.header;
        let loc = image.loc();
        if h.repo_id != self.repo_id {
            return Err(format!(
                "{loc}: belongs to another repository ({}, this is {}); move it out",
                hex_id(&h.repo_id),
                hex_id(&self.repo_id)
            ));
        }
        if h.version != id {
            return Err(format!("{loc}: holds version {} but is named for version {id}", h.version));
        }
        if h.block_size != self.block_size {
            return Err(format!(
                "{loc}: block size {} differs from the repository's {}",
                h.block_size, self.block_size
            ));
        }
        Ok(image)
    }

    /// The id the next backup gets: above every image present and every id ever published.
    pub fn next_version_id(&self, state: &RepoState) -> Result<u64> {
        let newest_file = state.images.keys().next_back().copied().unwrap_or(0);
        let next = newest_file.max(self.last_version) + 1;
        if next > MAX_VERSION_ID {
            return Err(FormatError::Invalid(format!(
                "{}: every version id up to {MAX_VERSION_ID} is used; start a new repository",
                self.path.display()
            )));
        }
        Ok(next)
    }
}

struct Identity {
    repo_id: Id128,
    block_size: u32,
    last_version: u64,
    last_source_full: Option<(u64, i64)>,
}

impl Identity {
    fn parse(text: &str) -> std::result::Result<Identity, String> {
        let mut fields = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (k, v) = line.split_once('=').ok_or_else(|| format!("unreadable line {line:?}"))?;
            fields.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        }
        let get = |k: &str| fields.get(k).ok_or_else(|| format!("no {k}"));
        let format: u32 = get("format")?.parse().map_err(|_| "bad format".to_string())?;
        if !(layout::OLDEST_FORMAT_VERSION..=layout::FORMAT_VERSION).contains(&format) {
            return Err(format!(
                "format {format}; this strata reads formats {} to {}",
                layout::OLDEST_FORMAT_VERSION,
                layout::FORMAT_VERSION
            ));
        }
        let hex = get("repo_id")?;
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("bad repo_id".into());
        }
        let mut repo_id = [0u8; 16];
        for (i, byte) in repo_id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| "bad repo_id".to_string())?;
        }
        let block_size: u32 = get("block_size")?.parse().map_err(|_| "bad block_size".to_string())?;
        check_block_size(block_size).map_err(|e| e.to_string())?;
        let last_version: u64 = get("last_version")?.parse().map_err(|_| "bad last_version".to_string())?;
        if last_version > MAX_VERSION_ID {
            return Err(format!("last_version {last_version} is above the highest id {MAX_VERSION_ID}"));
        }
        let last_source_full = match (fields.get("last_source_full"), fields.get("last_source_full_time")) {
            (Some(id), Some(t)) => Some((
                id.parse().map_err(|_| "bad last_source_full".to_string())?,
                t.parse().map_err(|_| "bad last_source_full_time".to_string())?,
            )),
            _ => None,
        };
        Ok(Identity { repo_id, block_size, last_version, last_source_full })
    }
}

/// One image file of the repository: opened, or why it could not be.
#[derive(Debug, Clone)]
pub struct Slot {
    pub path: PathBuf,
    pub image: std::result::Result<Arc<ImageFile>, String>,
}

/// A snapshot of a repository's images and what each version needs.
#[derive(Debug)]
pub struct RepoState {
    pub repo: Repository,
    pub images: BTreeMap<u64, Slot>,
}

/// The health of one version.
#[derive(Debug, Clone)]
pub struct VersionStatus {
    pub id: u64,
    pub path: PathBuf,
    pub image: Option<Arc<ImageFile>>,
    /// Ids of the chain, full first, as far as it could be followed.
    pub chain: Vec<u64>,
    /// Why the version cannot be restored; `None` when it can.
    pub problem: Option<String>,
}

impl VersionStatus {
    pub fn restorable(&self) -> bool {
        self.problem.is_none()
    }
}

impl RepoState {
    /// Reads and checks the index of every sound image; marks those that fail as damaged.
    pub fn check_indexes(&mut self) {
        for slot in self.images.values_mut() {
            if let Ok(image) = &slot.image {
                if let Err(e) = image.check_index() {
                    slot.image = Err(e.to_string());
                }
            }
        }
    }

    /// Marks version `id`'s image as damaged (for example after a failed data check).
    pub fn mark_damaged(&mut self, id: u64, why: String) {
        if let Some(slot) = self.images.get_mut(&id) {
            slot.image = Err(why);
        }
    }

    pub fn ids(&self) -> impl DoubleEndedIterator<Item = u64> + '_ {
        self.images.keys().copied()
    }

    /// The chain of images version `id` needs, full first, or why it cannot be had.
    pub fn chain(&self, id: u64) -> std::result::Result<Vec<Arc<ImageFile>>, String> {
        let mut chain = Vec::new();
        let mut want = id;
        let mut want_image: Option<Id128> = None;
        let mut child: Option<u64> = None;
        loop {
            let name = image_file_name(want);
            let slot = match self.images.get(&want) {
                Some(s) => s,
                None => {
                    return Err(match child {
                        Some(c) => {
                            format!("needs version {want} ({name}), which is missing (from version {c}'s chain)")
                        }
                        None => format!("no image {name}"),
                    })
                }
            };
            let image = match &slot.image {
                Ok(img) => img.clone(),
                Err(why) if want == id => return Err(format!("its image is damaged: {why}")),
                Err(why) => return Err(format!("needs version {want} ({name}), which is damaged: {why}")),
            };
            if let Some(expected) = want_image {
                if image.header.image_id != expected {
                    return Err(format!(
                        "needs version {want} ({name}), but that file is not the image it was made from \
                         (replaced or copied in from elsewhere)"
                    ));
                }
                let top: &Arc<ImageFile> = &chain[0];
                if image.header.source_size != top.header.source_size {
                    return Err(format!("needs version {want} ({name}), whose source size differs"));
                }
            }
            chain.push(image.clone());
            if chain.len() > layout::MAX_CHAIN_LEN {
                return Err(format!("chain longer than {} images", layout::MAX_CHAIN_LEN));
            }
            if let Some(c) = chain.iter().rev().nth(1) {
                let c: &Arc<ImageFile> = c;
                if c.header.kind == Kind::Differential && image.header.kind != Kind::Full {
                    return Err(format!("{}: a differential whose parent is not a full", c.loc()));
                }
            }
            match image.header.parent {
                None => break,
                Some(parent) => {
                    child = Some(want);
                    want = parent.version;
                    want_image = Some(parent.image_id);
                }
            }
        }
        chain.reverse();
        Ok(chain)
    }

    pub fn status(&self, id: u64) -> VersionStatus {
        let slot = self.images.get(&id);
        let path = slot.map(|s| s.path.clone()).unwrap_or_else(|| self.repo.image_path(id));
        let image = slot.and_then(|s| s.image.as_ref().ok().cloned());
        match self.chain(id) {
            Ok(chain) => VersionStatus {
                id,
                path,
                image,
                chain: chain.iter().map(|i| i.header.version).collect(),
                problem: None,
            },
            Err(problem) => {
                let mut ids = Vec::new();
                let mut cur = image.clone();
                while let Some(img) = cur {
                    ids.push(img.header.version);
                    cur = img.header.parent.and_then(|p| self.images.get(&p.version)?.image.as_ref().ok().cloned());
                    if ids.len() > layout::MAX_CHAIN_LEN {
                        break;
                    }
                }
                ids.reverse();
                VersionStatus { id, path, image, chain: ids, problem: Some(problem) }
            }
        }
    }

    pub fn statuses(&self) -> Vec<VersionStatus> {
        self.ids().map(|id| self.status(id)).collect()
    }

    /// The newest restorable version.
    pub fn latest_restorable(&self) -> Option<u64> {
        self.ids().rev().find(|&id| self.chain(id).is_ok())
    }

    /// Resolves a version name as users write it: a number or `latest`.
    pub fn resolve_name(&self, name: &str) -> Result<u64> {
        if name == "latest" {
            return self
                .latest_restorable()
                .ok_or_else(|| FormatError::NoRestorableVersion { repo: self.repo.path.clone() });
        }
        let id: u64 = name.parse().map_err(|_| {
            FormatError::Invalid(format!("{name:?} is not a version (a number such as 3, or `latest`)"))
        })?;
        if !self.images.contains_key(&id) {
            return Err(FormatError::NoSuchVersion { repo: self.repo.path.clone(), id });
        }
        Ok(id)
    }

    /// Opens version `id` for reading.
    pub fn open_version(&self, id: u64) -> Result<VersionReader> {
        let chain =
            self.chain(id).map_err(|reason| FormatError::NotRestorable { repo: self.repo.path.clone(), id, reason })?;
        VersionReader::from_chain(chain)
    }
}
