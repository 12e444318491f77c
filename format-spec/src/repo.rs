//! A repository: its identity file, the image files in it, the backup lock, version ids,
//! leftovers of interrupted backups, and the health of every version (which chain it needs and
//! whether every member of that chain is present and sound).
//!
//! The identity file `strata.repo` carries a checksum. When it is missing, damaged or (written
//! before it had a checksum) names a repository that no image belongs to, the identity is
//! rebuilt from the image headers, which all carry it: readers go on with a warning, and the
//! next writer (which takes the lock) writes the file again. Sound images are never called
//! foreign because of a damaged identity file.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{ChainProblem, FormatError, Loc, Result};
use crate::header::{check_block_size, hex_id, new_id, Id128, ImageHeader, Kind, Rule};
use crate::image::{ImageFile, ImageWriter};
use crate::layout::{self, HEADER_SIZE, IMAGE_SUFFIX, REPO_FILE, TEMP_PREFIX};
use crate::storage::{self, EntryKind, Folder, Storage};
use crate::version::VersionReader;

#[derive(Debug, Clone)]
pub struct Repository {
    storage: Arc<dyn Storage>,
    pub repo_id: Id128,
    pub block_size: u32,
    /// Highest version id ever published here (ids are never reused).
    pub last_version: u64,
    /// The newest full read from the source (not a merge): (version id, creation seconds);
    /// what "a full every N backups / D days" counts from, whatever merges and prunes did since.
    pub last_source_full: Option<(u64, i64)>,
    /// Why the identity was rebuilt from the image headers when the repository was opened
    /// (`strata.repo` missing or damaged); the next `lock` writes it again.
    pub rebuilt: Option<String>,
}

/// An exclusive hold on the repository for writing; released on drop.
#[derive(Debug)]
pub struct RepoLock {
    _held: Box<dyn std::fmt::Debug + Send + Sync>,
}

pub fn image_file_name(id: u64) -> String {
    format!("v{id:08}{IMAGE_SUFFIX}")
}

/// Threads that open images side by side: opening reads a header and a footer, two waits each
/// on a cold disk, which a long chain's hundreds of images would otherwise take one by one.
const OPEN_THREADS: usize = 8;

/// Opens the images `found` of `storage`, in order, on up to `OPEN_THREADS` threads.
fn open_images(storage: &dyn Storage, found: &[(u64, String)]) -> Vec<Result<ImageFile>> {
    let threads = OPEN_THREADS.min(found.len() / 4).max(1);
    if threads == 1 {
        return found.iter().map(|(_, name)| ImageFile::open_in(storage, name)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut opened: Vec<(usize, Result<ImageFile>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((_, name)) = found.get(i) else { return mine };
                        mine.push((i, ImageFile::open_in(storage, name)));
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
    /// Where the repository is, for messages (a folder's path).
    pub fn path(&self) -> &Path {
        self.storage.root()
    }

    /// Where version `id`'s image is, for messages.
    pub fn image_path(&self, id: u64) -> PathBuf {
        self.storage.locate(&image_file_name(id))
    }

    /// Where the repository's files live.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// Starts the image of version `id`; `ImageWriter::finish` publishes it.
    pub fn create_image(&self, id: u64, header: ImageHeader) -> Result<ImageWriter> {
        ImageWriter::create_in(&*self.storage, &image_file_name(id), header)
    }

    /// Deletes the image of version `id`; durable after `sync`. Needs the lock.
    pub fn remove_image(&self, _lock: &RepoLock, id: u64) -> Result<()> {
        self.storage.remove(&image_file_name(id))
    }

    /// The length of version `id`'s image file (0 when it cannot be read).
    pub fn image_bytes(&self, id: u64) -> u64 {
        self.storage.open(&image_file_name(id)).and_then(|blob| blob.len()).unwrap_or(0)
    }

    /// Makes the deletes before it durable.
    pub fn sync(&self) -> Result<()> {
        self.storage.sync()
    }

    /// The text of the repository's file `name` (at most `limit` bytes), if it is there.
    pub fn read_file(&self, name: &str, limit: u64) -> Result<Option<String>> {
        storage::read_text_at(&*self.storage, name, limit)
    }

    /// Replaces the repository's file `name` with `bytes`, atomically and durably.
    pub fn put_file(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.storage.put(name, bytes)
    }

    /// Creates a new repository in the folder `path` (it may exist but must not hold one).
    pub fn create(path: &Path, block_size: u32) -> Result<Repository> {
        check_block_size(block_size)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| FormatError::io(Loc::file(path), "create repository folder", e))?;
        if path.join(REPO_FILE).symlink_metadata().is_ok() {
            return Err(FormatError::Invalid(format!("{}: a repository already exists here", path.display())));
        }
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| FormatError::io(Loc::file(path), "make the repository folder private (0700)", e))?;
        Repository::create_in(Arc::new(Folder::new(path)), block_size)
    }

    /// Creates a new repository in `storage`, which must not hold one.
    pub fn create_in(storage: Arc<dyn Storage>, block_size: u32) -> Result<Repository> {
        check_block_size(block_size)?;
        if storage.kind(REPO_FILE)?.is_some() {
            return Err(FormatError::Invalid(format!(
                "{}: a repository already exists here",
                storage.root().display()
            )));
        }
        let repo = Repository {
            storage,
            repo_id: new_id(),
            block_size,
            last_version: 0,
            last_source_full: None,
            rebuilt: None,
        };
        repo.write_identity()?;
        Ok(repo)
    }

    /// Opens the repository in the folder `path` (see `open_in`).
    pub fn open(path: &Path) -> Result<Repository> {
        if !path.is_dir() {
            let detail = if path.exists() { "not a folder" } else { "no such folder" };
            return Err(FormatError::NotARepository { path: path.to_path_buf(), detail: detail.into() });
        }
        warn_about_folder_access(path);
        Repository::open_in(Arc::new(Folder::new(path)))
    }

    /// Opens the repository in `storage`. A missing or damaged identity file is rebuilt from
    /// the image headers (in memory; `rebuilt` says why, and the next `lock` writes it).
    pub fn open_in(storage: Arc<dyn Storage>) -> Result<Repository> {
        let path = storage.root().to_path_buf();
        let not_repo = |detail: String| FormatError::NotARepository { path: path.clone(), detail };
        let damage = match storage::read_text(&*storage, REPO_FILE, IDENTITY_MAX) {
            Ok(text) => match Identity::parse(&text) {
                Ok(identity) => match identity_mismatch(&*storage, &identity)? {
                    None => return Ok(identity.into_repository(storage, None)),
                    Some(why) => why,
                },
                Err(IdentityError::Unsupported(detail)) => return Err(not_repo(format!("{REPO_FILE}: {detail}"))),
                Err(IdentityError::Damaged(detail)) => format!("{REPO_FILE} is damaged ({detail})"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if image_names(&*storage)?.is_empty() {
                    return Err(not_repo(format!("no {REPO_FILE} file")));
                }
                format!("{REPO_FILE} is missing")
            }
            Err(e) => format!("{REPO_FILE} cannot be read ({e})"),
        };
        Self::rebuild(storage, damage)
    }

    /// The identity as the image headers carry it, when `strata.repo` cannot be trusted.
    fn rebuild(storage: Arc<dyn Storage>, damage: String) -> Result<Repository> {
        let path = storage.root().to_path_buf();
        let headers = image_headers(&*storage)?;
        let mut groups: BTreeMap<(Id128, u32), Vec<u64>> = BTreeMap::new();
        for (id, h) in &headers {
            groups.entry((h.repo_id, h.block_size)).or_default().push(*id);
        }
        let detail = match groups.len() {
            0 => format!("{damage}, and no sound image to rebuild it from"),
            1 => {
                let ((repo_id, block_size), ids) = groups.into_iter().next().expect("one group");
                let last_version = ids.iter().copied().max().unwrap_or(0);
                let last_source_full = headers
                    .iter()
                    .rev()
                    .find(|(_, h)| h.kind == Kind::Full && h.rule != Rule::Merged)
                    .map(|(id, h)| (*id, h.created_secs));
                let why = format!(
                    "{damage}; the {} image(s) agree on repository id {} and block size {block_size}, which are used",
                    ids.len(),
                    hex_id(&repo_id)
                );
                log::warn!(
                    "{}: {why}; the next backup, merge or prune writes {REPO_FILE} again (or run `strata repair {}`)",
                    path.display(),
                    path.display()
                );
                return Ok(Repository {
                    storage,
                    repo_id,
                    block_size,
                    last_version,
                    last_source_full,
                    rebuilt: Some(why),
                });
            }
            _ => {
                let list: Vec<String> = groups
                    .iter()
                    .map(|((id, bs), ids)| format!("{} (block size {bs}): versions {ids:?}", hex_id(id)))
                    .collect();
                format!(
                    "{damage}, and the images belong to {} repositories: {}; keep the images of one repository \
                     in this folder and run `strata repair {}`",
                    list.len(),
                    list.join("; "),
                    path.display()
                )
            }
        };
        Err(FormatError::DamagedIdentity { path, detail })
    }

    /// Writes the identity file durably, with its checksum.
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
        text += &format!("checksum = \"crc32c:{:08x}\"\n", crc32c::crc32c(text.as_bytes()));
        self.storage.put(REPO_FILE, text.as_bytes())
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

    /// Takes the repository's write lock, or fails at once if another process holds it. An
    /// identity that was rebuilt from the images when the repository was opened is written.
    pub fn lock(&mut self) -> Result<RepoLock> {
        let lock = RepoLock { _held: self.storage.lock()? };
        if let Some(why) = self.rebuilt.take() {
            self.write_identity()?;
            log::warn!("{}: rewrote {REPO_FILE} from the image headers ({why})", self.path().display());
        }
        Ok(lock)
    }

    /// Writes the identity file again from what is known of the repository (the image headers
    /// when it was rebuilt). Needs the lock.
    pub fn rewrite_identity(&self, _lock: &RepoLock) -> Result<()> {
        self.write_identity()
    }

    /// Removes what interrupted backups left behind (temporary files, or links planted at such
    /// names; a link is removed, never followed). Anything else with a temporary name, such as
    /// a folder, is left alone with a warning. Needs the lock.
    pub fn remove_leftovers(&self, _lock: &RepoLock) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for (name, kind) in self.storage.list()? {
            if !name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let p = self.storage.locate(&name);
            if !matches!(kind, EntryKind::File | EntryKind::Link) {
                log::warn!("{}: not a file strata left behind; left alone", p.display());
                continue;
            }
            self.storage.remove(&name)?;
            removed.push(p);
        }
        if !removed.is_empty() {
            self.storage.sync()?;
        }
        Ok(removed)
    }

    /// Opens every image file and works out the health of every version. Reads headers and
    /// footers only; `RepoState::check_indexes` reads the indexes too.
    pub fn scan(&self) -> Result<RepoState> {
        let found = image_names(&*self.storage)?;
        let opened = open_images(&*self.storage, &found);
        let images = found
            .into_iter()
            .zip(opened)
            .map(|((id, name), image)| {
                let image = image.map_err(|e| e.to_string()).and_then(|img| self.belongs(id, img));
                (id, Slot { path: self.storage.locate(&name), image: image.map(Arc::new) })
            })
            .collect();
        Ok(RepoState { repo: self.clone(), images })
    }

    fn belongs(&self, id: u64, image: ImageFile) -> std::result::Result<ImageFile, String> {
        let h = &image.header;
        let loc = image.loc();
        if h.repo_id != self.repo_id {
            return Err(format!(
                "{loc}: belongs to another repository ({}; this one is {}): it was copied in from elsewhere \
                 and is not used here",
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

    /// The id the next backup gets: above every sound image and every id ever published, and
    /// at a name where no file is (a damaged image, or a stray file, is never replaced).
    pub fn next_version_id(&self, state: &RepoState) -> Result<u64> {
        let newest_sound = state.images.iter().rev().find(|(_, s)| s.image.is_ok()).map_or(0, |(id, _)| *id);
        let mut next = newest_sound.max(self.last_version) + 1;
        while next <= MAX_VERSION_ID && self.storage.kind(&image_file_name(next))?.is_some() {
            next += 1;
        }
        if next > MAX_VERSION_ID {
            return Err(FormatError::Invalid(format!(
                "{}: every version id up to {MAX_VERSION_ID} is used; start a new repository",
                self.path().display()
            )));
        }
        Ok(next)
    }
}

/// Longest identity file read (it is a few hundred bytes).
const IDENTITY_MAX: u64 = 64 << 10;

/// The image files of `storage`: (version id, name), in id order.
fn image_names(storage: &dyn Storage) -> Result<Vec<(u64, String)>> {
    let mut found: Vec<(u64, String)> =
        storage.list()?.into_iter().filter_map(|(name, _)| parse_image_file_name(&name).map(|id| (id, name))).collect();
    found.sort_unstable();
    Ok(found)
}

/// Warns when others could plant or swap files in the repository folder: strata never follows
/// their links or writes through them, but they could still remove or replace images.
fn warn_about_folder_access(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else { return };
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        let who = if mode & 0o002 != 0 { "every user" } else { "its group" };
        log::warn!(
            "{}: the repository folder is writable by {who} (mode {mode:04o}): they can add, remove or \
             replace images; `chmod 700 {}` makes it private",
            path.display(),
            path.display()
        );
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        log::warn!(
            "{}: the repository folder belongs to user {}, not to the user running strata ({me}): that user \
             can add, remove or replace images",
            path.display(),
            meta.uid()
        );
    }
}

/// The sound headers (checksum verified, named for the version they hold) of the images of
/// `storage`, in id order.
fn image_headers(storage: &dyn Storage) -> Result<Vec<(u64, ImageHeader)>> {
    let names = image_names(storage)?;
    Ok(names.into_iter().filter_map(|(id, name)| sound_header(storage, id, &name).map(|h| (id, h))).collect())
}

/// The header of the image file `name`, when its checksum holds and it names version `id`.
fn sound_header(storage: &dyn Storage, id: u64, name: &str) -> Option<ImageHeader> {
    let file = storage.open(name).ok()?;
    let mut hb = [0u8; HEADER_SIZE];
    file.read_exact_at(&mut hb, 0).ok()?;
    ImageHeader::decode(&hb, &Loc::file(&storage.locate(name))).ok().filter(|h| h.version == id)
}

/// Why the identity file cannot be right, when sound images exist and none of them belongs to
/// the repository it names (an identity file copied from another repository, or edited with its
/// checksum made to match, or written before it had one). A checksummed file is first checked
/// against the newest sound header alone, so that opening costs one header read.
fn identity_mismatch(storage: &dyn Storage, identity: &Identity) -> Result<Option<String>> {
    let ours = |h: &ImageHeader| h.repo_id == identity.repo_id && h.block_size == identity.block_size;
    if identity.checksummed {
        let names = image_names(storage)?;
        if names.iter().rev().find_map(|(id, name)| sound_header(storage, *id, name)).is_none_or(|h| ours(&h)) {
            return Ok(None);
        }
    }
    let headers = image_headers(storage)?;
    if headers.is_empty() || headers.iter().any(|(_, h)| ours(h)) {
        return Ok(None);
    }
    Ok(Some(format!(
        "{REPO_FILE}{} names repository {} with block size {}, which none of the {} image(s) carries",
        if identity.checksummed { "" } else { " (written without a checksum)" },
        hex_id(&identity.repo_id),
        identity.block_size,
        headers.len()
    )))
}

enum IdentityError {
    /// Unreadable: damaged.
    Damaged(String),
    /// Sound, but of a format this strata does not read.
    Unsupported(String),
}

struct Identity {
    repo_id: Id128,
    block_size: u32,
    last_version: u64,
    last_source_full: Option<(u64, i64)>,
    /// Whether the file carried a checksum (files written before 0.4 have none).
    checksummed: bool,
}

impl Identity {
    fn parse(text: &str) -> std::result::Result<Identity, IdentityError> {
        let damaged = |d: String| IdentityError::Damaged(d);
        let mut checksummed = false;
        if let Some(at) = text.find("\nchecksum") {
            let (body, line) = text.split_at(at + 1);
            let recorded = line.trim_end().split_once('=').map(|(_, v)| v.trim().trim_matches('"'));
            let expected = format!("crc32c:{:08x}", crc32c::crc32c(body.as_bytes()));
            if recorded != Some(expected.as_str()) {
                return Err(damaged(format!(
                    "checksum {} recorded, the text sums to {expected}",
                    recorded.unwrap_or("(unreadable)")
                )));
            }
            checksummed = true;
        }
        let mut fields = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (k, v) = line.split_once('=').ok_or_else(|| damaged(format!("unreadable line {line:?}")))?;
            fields.insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
        }
        let get = |k: &str| fields.get(k).ok_or_else(|| damaged(format!("no {k}")));
        let format: u32 = get("format")?.parse().map_err(|_| damaged("bad format".into()))?;
        if !(layout::OLDEST_FORMAT_VERSION..=layout::FORMAT_VERSION).contains(&format) {
            let detail = format!(
                "format {format}; this strata reads formats {} to {}",
                layout::OLDEST_FORMAT_VERSION,
                layout::FORMAT_VERSION
            );
            return Err(if checksummed { IdentityError::Unsupported(detail) } else { damaged(detail) });
        }
        let hex = get("repo_id")?;
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(damaged("bad repo_id".into()));
        }
        let mut repo_id = [0u8; 16];
        for (i, byte) in repo_id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| damaged("bad repo_id".into()))?;
        }
        let block_size: u32 = get("block_size")?.parse().map_err(|_| damaged("bad block_size".into()))?;
        check_block_size(block_size).map_err(|e| damaged(e.to_string()))?;
        let last_version: u64 = get("last_version")?.parse().map_err(|_| damaged("bad last_version".into()))?;
        if last_version > MAX_VERSION_ID {
            return Err(damaged(format!("last_version {last_version} is above the highest id {MAX_VERSION_ID}")));
        }
        let last_source_full = match (fields.get("last_source_full"), fields.get("last_source_full_time")) {
            (Some(id), Some(t)) => Some((
                id.parse().map_err(|_| damaged("bad last_source_full".into()))?,
                t.parse().map_err(|_| damaged("bad last_source_full_time".into()))?,
            )),
            _ => None,
        };
        Ok(Identity { repo_id, block_size, last_version, last_source_full, checksummed })
    }

    fn into_repository(self, storage: Arc<dyn Storage>, rebuilt: Option<String>) -> Repository {
        Repository {
            storage,
            repo_id: self.repo_id,
            block_size: self.block_size,
            last_version: self.last_version,
            last_source_full: self.last_source_full,
            rebuilt,
        }
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
    pub problem: Option<ChainProblem>,
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
    pub fn chain(&self, id: u64) -> std::result::Result<Vec<Arc<ImageFile>>, ChainProblem> {
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
                        Some(from) => ChainProblem::NeedsMissing { needed: want, name, from },
                        None => ChainProblem::NoImage { name },
                    })
                }
            };
            let image = match &slot.image {
                Ok(img) => img.clone(),
                Err(why) if want == id => return Err(ChainProblem::Damaged { why: why.clone() }),
                Err(why) => return Err(ChainProblem::NeedsDamaged { needed: want, name, why: why.clone() }),
            };
            if let Some(expected) = want_image {
                if image.header.image_id != expected {
                    return Err(ChainProblem::NeedsReplaced { needed: want, name });
                }
                let top: &Arc<ImageFile> = &chain[0];
                if image.header.source_size != top.header.source_size {
                    return Err(ChainProblem::NeedsOtherSize { needed: want, name });
                }
            }
            chain.push(image.clone());
            if chain.len() > layout::MAX_CHAIN_LEN {
                return Err(ChainProblem::TooLong { max: layout::MAX_CHAIN_LEN });
            }
            if let Some(c) = chain.iter().rev().nth(1) {
                let c: &Arc<ImageFile> = c;
                if c.header.kind == Kind::Differential && image.header.kind != Kind::Full {
                    return Err(ChainProblem::DifferentialWithoutFull { image: c.loc().to_string() });
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
                .ok_or_else(|| FormatError::NoRestorableVersion { repo: self.repo.path().to_path_buf() });
        }
        let id: u64 = name.parse().map_err(|_| {
            FormatError::Invalid(format!("{name:?} is not a version (a number such as 3, or `latest`)"))
        })?;
        if !self.images.contains_key(&id) {
            return Err(FormatError::NoSuchVersion { repo: self.repo.path().to_path_buf(), id });
        }
        Ok(id)
    }

    /// Opens version `id` for reading.
    pub fn open_version(&self, id: u64) -> Result<VersionReader> {
        let chain = self.chain(id).map_err(|reason| FormatError::NotRestorable {
            repo: self.repo.path().to_path_buf(),
            id,
            reason,
        })?;
        VersionReader::from_chain(chain)
    }
}
