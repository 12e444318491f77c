//! The key slots file `strata.keys` (SPEC.md §8.1) and the master key it wraps.
//!
//! An encrypted repository has one random 32-byte master key. Each slot holds it wrapped
//! (XChaCha20-Poly1305, with a random nonce) under a key-encryption key made from one secret: a passphrase through Argon2id
//! with the slot's own salt and parameters, or a key file's 32 random bytes through BLAKE3's key
//! derivation. The associated data binds a wrapped key to its repository and slot, so a slot
//! copied from another repository or renumbered opens nothing. Adding, removing or changing a
//! passphrase rewrites this file only. Parameters read from the file are bounded before use: a
//! hostile file cannot make strata allocate more than `KdfParams::MAX_MEMORY_KIB` or spin
//! through more than `KdfParams::MAX_ITERATIONS` passes.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::XChaCha20Poly1305;
use zeroize::Zeroizing;

use super::random;
use super::seal::ImageSeal;

/// The name of the key slots file in a repository.
pub const KEYS_FILE: &str = "strata.keys";
/// The version of the key slots file's layout.
const KEYS_FORMAT: u32 = 1;
/// The most slots a file may hold (as LUKS2's 32).
pub const MAX_SLOTS: usize = 32;
/// Bytes of a key file.
pub const KEY_FILE_LEN: usize = 32;
/// Bytes of a wrapped master key: the key and its tag.
const WRAPPED_LEN: usize = 32 + 16;
/// The longest `strata.keys` a reader accepts.
pub const KEYS_FILE_MAX: u64 = 64 << 10;

/// Context strings of BLAKE3's key derivation: one per purpose, never reused.
const CONTEXT_KEY_FILE: &str = "strata 2026-12-04 key file wrapping key";
const CONTEXT_BLOCK_HASH: &str = "strata 2026-12-04 keyed block hash";
const CONTEXT_IMAGE: &str = "strata 2026-12-04 image key";
const WRAP_AD: &[u8] = b"strata key slot v1\0";

/// Argon2id's cost parameters for one passphrase slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes over the memory.
    pub iterations: u32,
    /// Lanes.
    pub lanes: u32,
}

impl KdfParams {
    /// RFC 9106's second recommended option: 64 MiB, 3 passes, 4 lanes.
    pub const DEFAULT: KdfParams = KdfParams { memory_kib: 64 << 10, iterations: 3, lanes: 4 };
    /// The most memory a slot may ask for: 1 GiB.
    pub const MAX_MEMORY_KIB: u32 = 1 << 20;
    /// The most passes a slot may ask for.
    pub const MAX_ITERATIONS: u32 = 64;
    /// The most lanes a slot may ask for.
    pub const MAX_LANES: u32 = 16;

    fn check(&self) -> Result<(), String> {
        let KdfParams { memory_kib, iterations, lanes } = *self;
        if !(1..=Self::MAX_LANES).contains(&lanes)
            || !(1..=Self::MAX_ITERATIONS).contains(&iterations)
            || memory_kib < 8 * lanes
            || memory_kib > Self::MAX_MEMORY_KIB
        {
            return Err(format!(
                "Argon2id parameters m={memory_kib} t={iterations} p={lanes} are outside 8×p..={} KiB, 1..={} passes, 1..={} lanes",
                Self::MAX_MEMORY_KIB,
                Self::MAX_ITERATIONS,
                Self::MAX_LANES
            ));
        }
        Ok(())
    }
}

/// What opens a slot.
pub enum Secret {
    Passphrase(Zeroizing<Vec<u8>>),
    KeyFile(Zeroizing<[u8; KEY_FILE_LEN]>),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Passphrase(_) => "Secret::Passphrase(..)",
            Secret::KeyFile(_) => "Secret::KeyFile(..)",
        })
    }
}

impl Secret {
    /// A passphrase: any bytes but none (a trailing newline is the caller's to strip).
    pub fn passphrase(bytes: Vec<u8>) -> Result<Secret, String> {
        let bytes = Zeroizing::new(bytes);
        if bytes.is_empty() {
            return Err("the passphrase is empty".into());
        }
        Ok(Secret::Passphrase(bytes))
    }

    /// A key file's content: exactly 32 bytes.
    pub fn key_file(bytes: &[u8]) -> Result<Secret, String> {
        let key: [u8; KEY_FILE_LEN] = bytes.try_into().map_err(|_| {
            format!(
                "a key file holds exactly {KEY_FILE_LEN} bytes, this one {} (make one with `strata key generate`)",
                bytes.len()
            )
        })?;
        Ok(Secret::KeyFile(Zeroizing::new(key)))
    }

    /// 32 fresh random bytes, for a new key file.
    pub fn new_key_file() -> Secret {
        let mut key = Zeroizing::new([0u8; KEY_FILE_LEN]);
        random(&mut key[..]);
        Secret::KeyFile(key)
    }

    /// The key file's bytes, to write it out.
    pub fn key_file_bytes(&self) -> Option<&[u8; KEY_FILE_LEN]> {
        match self {
            Secret::KeyFile(key) => Some(key),
            Secret::Passphrase(_) => None,
        }
    }
}

/// How a slot's key-encryption key is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    Passphrase { params: KdfParams, salt: [u8; 16] },
    KeyFile,
}

/// One wrapped copy of the master key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// 1.. ; never reused within a file while the slot exists.
    pub id: u32,
    pub kind: SlotKind,
    /// When it was added, seconds since 1970 (informational).
    pub created: i64,
    nonce: [u8; 24],
    wrapped: [u8; WRAPPED_LEN],
}

impl Slot {
    /// "passphrase" or "key file", for `key list`.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            SlotKind::Passphrase { .. } => "passphrase",
            SlotKind::KeyFile => "key file",
        }
    }
}

/// The repository's master key; every other key is derived from it.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    fn generate() -> MasterKey {
        let mut key = Zeroizing::new([0u8; 32]);
        random(&mut key[..]);
        MasterKey(key)
    }

    /// The key of the keyed BLAKE3 hash that stands for plain BLAKE3 in an encrypted
    /// repository: block hashes, so that they say nothing of the content without the key.
    pub fn block_hash_key(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(blake3::derive_key(CONTEXT_BLOCK_HASH, &self.0[..]))
    }

    /// The seal of the image file whose header carries `salt`.
    pub fn image_seal(&self, salt: &[u8; 32]) -> ImageSeal {
        let derive = Zeroizing::new(blake3::derive_key(CONTEXT_IMAGE, &self.0[..]));
        ImageSeal::new(Zeroizing::new(*blake3::keyed_hash(&derive, salt).as_bytes()))
    }
}

/// The key slots of one repository: what `strata.keys` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlots {
    pub repo_id: [u8; 16],
    slots: Vec<Slot>,
}

impl KeySlots {
    /// A new master key and the file that opens it with `secret`.
    pub fn create(
        repo_id: [u8; 16],
        secret: &Secret,
        params: KdfParams,
        now: i64,
    ) -> Result<(KeySlots, MasterKey), String> {
        let master = MasterKey::generate();
        let mut slots = KeySlots { repo_id, slots: Vec::new() };
        slots.add(&master, secret, params, now)?;
        Ok((slots, master))
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The master key, when a slot of the secret's kind opens with it, and that slot's id.
    /// Every such slot is tried (each passphrase slot costs one Argon2id run).
    pub fn unlock(&self, secret: &Secret) -> Option<(MasterKey, u32)> {
        self.slots.iter().find_map(|slot| {
            let kek = kek(secret, &slot.kind).ok()??;
            let cipher = XChaCha20Poly1305::new((&*kek).into());
            let ad = wrap_ad(&self.repo_id, slot);
            let key = cipher.decrypt((&slot.nonce).into(), Payload { msg: &slot.wrapped, aad: &ad }).ok()?;
            let key = Zeroizing::new(key);
            let master: [u8; 32] = key.as_slice().try_into().ok()?;
            Some((MasterKey(Zeroizing::new(master)), slot.id))
        })
    }

    /// Adds a slot that opens `master` with `secret`; returns its id.
    pub fn add(&mut self, master: &MasterKey, secret: &Secret, params: KdfParams, now: i64) -> Result<u32, String> {
        if self.slots.len() >= MAX_SLOTS {
            return Err(format!(
                "the repository has {MAX_SLOTS} key slots already, the most it may have; remove one first"
            ));
        }
        let id = (1..).find(|id| self.slots.iter().all(|s| s.id != *id)).expect("fewer than 2^32 slots");
        let kind = match secret {
            Secret::Passphrase(_) => {
                params.check()?;
                let mut salt = [0u8; 16];
                random(&mut salt);
                SlotKind::Passphrase { params, salt }
            }
            Secret::KeyFile(_) => SlotKind::KeyFile,
        };
        let mut nonce = [0u8; 24];
        random(&mut nonce);
        let mut slot = Slot { id, kind, created: now, nonce, wrapped: [0; WRAPPED_LEN] };
        let kek = kek(secret, &kind)?.expect("a slot made for this secret's kind");
        let cipher = XChaCha20Poly1305::new((&*kek).into());
        let ad = wrap_ad(&self.repo_id, &slot);
        let wrapped = cipher
            .encrypt((&nonce).into(), Payload { msg: &master.0[..], aad: &ad })
            .map_err(|_| "XChaCha20-Poly1305 refused to wrap the key".to_string())?;
        slot.wrapped.copy_from_slice(&wrapped);
        self.slots.push(slot);
        Ok(id)
    }

    /// Removes slot `id`; the last slot is never removed (the repository would be lost).
    pub fn remove(&mut self, id: u32) -> Result<(), String> {
        let at = self
            .slots
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| format!("no key slot {id}; `strata key list` shows them"))?;
        if self.slots.len() == 1 {
            return Err(format!(
                "key slot {id} is the last one: without it nothing opens the repository; add another first"
            ));
        }
        self.slots.remove(at);
        Ok(())
    }

    /// The file's text, with its checksum.
    pub fn render(&self) -> String {
        let mut text = String::from(
            "# strata key slots: the repository's master key, wrapped once per passphrase or key file.\n\
             # Without this file no version can be read: keep a copy (it is useless without a passphrase or key file).\n",
        );
        text += &format!("format = {KEYS_FORMAT}\nrepo_id = {}\n", hex(&self.repo_id));
        for slot in &self.slots {
            text += &format!("slot = {} ", slot.id);
            match slot.kind {
                SlotKind::Passphrase { params, salt } => {
                    text += &format!(
                        "passphrase argon2id m={} t={} p={} salt={} ",
                        params.memory_kib,
                        params.iterations,
                        params.lanes,
                        hex(&salt)
                    );
                }
                SlotKind::KeyFile => text += "keyfile ",
            }
            text += &format!("nonce={} wrapped={} created={}\n", hex(&slot.nonce), hex(&slot.wrapped), slot.created);
        }
        text += &format!("checksum = \"crc32c:{:08x}\"\n", crc32c::crc32c(text.as_bytes()));
        text
    }

    /// Reads the file's text; any damage is an error saying what is wrong.
    pub fn parse(text: &str) -> Result<KeySlots, String> {
        let at = text.rfind("checksum = ").ok_or("it has no checksum line")?;
        let (body, line) = text.split_at(at);
        let recorded = line.trim_end().strip_prefix("checksum = \"crc32c:").and_then(|s| s.strip_suffix('"'));
        let actual = format!("{:08x}", crc32c::crc32c(body.as_bytes()));
        if recorded != Some(actual.as_str()) {
            return Err(format!("its checksum does not match (the text sums to {actual})"));
        }
        let (mut format, mut repo_id, mut slots) = (None, None, Vec::<Slot>::new());
        for (n, line) in body.lines().enumerate().filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#')) {
            let bad = |what: &str| format!("line {}: {what}", n + 1);
            let (key, value) = line.split_once(" = ").ok_or_else(|| bad("not `key = value`"))?;
            match key {
                "format" => format = Some(value.parse::<u32>().map_err(|_| bad("format is not a number"))?),
                "repo_id" => repo_id = Some(unhex::<16>(value).ok_or_else(|| bad("repo_id is not 32 hex digits"))?),
                "slot" => {
                    let slot = parse_slot(value).map_err(|e| bad(&e))?;
                    if slots.iter().any(|s| s.id == slot.id) {
                        return Err(bad(&format!("slot {} appears twice", slot.id)));
                    }
                    slots.push(slot);
                }
                _ => return Err(bad(&format!("unknown key `{key}`"))),
            }
        }
        match format {
            Some(KEYS_FORMAT) => {}
            Some(other) => {
                return Err(format!(
                    "key slots format {other} is not supported (this strata reads {KEYS_FORMAT}); use a newer strata"
                ))
            }
            None => return Err("it names no format".into()),
        }
        let repo_id = repo_id.ok_or("it names no repo_id")?;
        if slots.is_empty() || slots.len() > MAX_SLOTS {
            return Err(format!("it holds {} key slots; 1 to {MAX_SLOTS} are allowed", slots.len()));
        }
        Ok(KeySlots { repo_id, slots })
    }
}

/// The key-encryption key that `secret` makes for a slot of `kind`; None when the kinds differ.
fn kek(secret: &Secret, kind: &SlotKind) -> Result<Option<Zeroizing<[u8; 32]>>, String> {
    Ok(match (secret, kind) {
        (Secret::Passphrase(phrase), SlotKind::Passphrase { params, salt }) => {
            params.check()?;
            let argon_params = argon2::Params::new(params.memory_kib, params.iterations, params.lanes, Some(32))
                .map_err(|e| format!("Argon2id parameters: {e}"))?;
            let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, argon_params);
            let mut key = Zeroizing::new([0u8; 32]);
            argon.hash_password_into(phrase, salt, &mut key[..]).map_err(|e| format!("Argon2id: {e}"))?;
            Some(key)
        }
        (Secret::KeyFile(file), SlotKind::KeyFile) => {
            Some(Zeroizing::new(blake3::derive_key(CONTEXT_KEY_FILE, &file[..])))
        }
        _ => None,
    })
}

/// What a wrapped key is bound to: the repository, the slot's id, kind and parameters.
fn wrap_ad(repo_id: &[u8; 16], slot: &Slot) -> Vec<u8> {
    let mut ad = WRAP_AD.to_vec();
    ad.extend_from_slice(repo_id);
    ad.extend_from_slice(&slot.id.to_le_bytes());
    match slot.kind {
        SlotKind::Passphrase { params, salt } => {
            ad.push(1);
            for v in [params.memory_kib, params.iterations, params.lanes] {
                ad.extend_from_slice(&v.to_le_bytes());
            }
            ad.extend_from_slice(&salt);
        }
        SlotKind::KeyFile => ad.push(2),
    }
    ad
}

fn parse_slot(value: &str) -> Result<Slot, String> {
    let mut words = value.split_ascii_whitespace();
    let id: u32 =
        words.next().and_then(|w| w.parse().ok()).filter(|&id| id > 0).ok_or("the slot id is not a number from 1")?;
    let kind_word = words.next().ok_or("the slot has no kind")?;
    let mut fields = std::collections::HashMap::new();
    let mut algorithm = None;
    for word in words {
        match word.split_once('=') {
            Some((k, v)) => {
                if fields.insert(k, v).is_some() {
                    return Err(format!("slot {id}: `{k}` appears twice"));
                }
            }
            None if algorithm.is_none() => algorithm = Some(word),
            None => return Err(format!("slot {id}: unexpected `{word}`")),
        }
    }
    let mut take = |k: &str| fields.remove(k).ok_or_else(|| format!("slot {id} has no `{k}`"));
    let number = |v: &str, k: &str| v.parse::<u32>().map_err(|_| format!("slot {id}: `{k}` is not a number"));
    let kind = match (kind_word, algorithm) {
        ("passphrase", Some("argon2id")) => {
            let params = KdfParams {
                memory_kib: number(take("m")?, "m")?,
                iterations: number(take("t")?, "t")?,
                lanes: number(take("p")?, "p")?,
            };
            params.check().map_err(|e| format!("slot {id}: {e}"))?;
            let salt = unhex::<16>(take("salt")?).ok_or_else(|| format!("slot {id}: salt is not 32 hex digits"))?;
            SlotKind::Passphrase { params, salt }
        }
        ("keyfile", None) => SlotKind::KeyFile,
        _ => {
            return Err(format!(
                "slot {id}: unknown kind `{kind_word}{}`",
                algorithm.map(|a| format!(" {a}")).unwrap_or_default()
            ))
        }
    };
    let nonce = unhex::<24>(take("nonce")?).ok_or_else(|| format!("slot {id}: nonce is not 48 hex digits"))?;
    let wrapped =
        unhex::<WRAPPED_LEN>(take("wrapped")?).ok_or_else(|| format!("slot {id}: wrapped is not 96 hex digits"))?;
    let created = take("created")?.parse::<i64>().map_err(|_| format!("slot {id}: `created` is not a number"))?;
    if let Some(k) = fields.keys().next() {
        return Err(format!("slot {id}: unknown field `{k}`"));
    }
    Ok(Slot { id, kind, created, nonce, wrapped })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cheap parameters: the tests are about the slots, not Argon2id's cost.
    const FAST: KdfParams = KdfParams { memory_kib: 64, iterations: 1, lanes: 1 };

    fn phrase(s: &str) -> Secret {
        Secret::passphrase(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn two_passphrases_and_a_key_file_open_one_master_key_and_a_wrong_one_opens_nothing() {
        let (mut slots, master) = KeySlots::create([7; 16], &phrase("first"), FAST, 1).unwrap();
        let second = slots.add(&master, &phrase("second"), FAST, 2).unwrap();
        let file = Secret::new_key_file();
        let third = slots.add(&master, &file, FAST, 3).unwrap();
        assert_eq!((second, third), (2, 3));
        let slots = KeySlots::parse(&slots.render()).unwrap();
        for (secret, id) in [(phrase("first"), 1), (phrase("second"), 2), (file, 3)] {
            let (key, opened) = slots.unlock(&secret).expect("opens");
            assert_eq!((opened, *key.0), (id, *master.0));
        }
        assert!(slots.unlock(&phrase("third")).is_none());
        assert!(slots.unlock(&Secret::new_key_file()).is_none());
    }

    #[test]
    fn a_removed_slot_locks_its_passphrase_out_and_the_last_slot_stays() {
        let (mut slots, master) = KeySlots::create([1; 16], &phrase("old"), FAST, 0).unwrap();
        slots.add(&master, &phrase("new"), FAST, 0).unwrap();
        slots.remove(1).unwrap();
        assert!(slots.unlock(&phrase("old")).is_none());
        assert!(slots.unlock(&phrase("new")).is_some());
        assert!(slots.remove(2).unwrap_err().contains("last one"));
        assert!(slots.remove(9).unwrap_err().contains("no key slot 9"));
        assert_eq!(slots.add(&master, &phrase("again"), FAST, 0).unwrap(), 1, "a free id is taken again");
    }

    #[test]
    fn a_slot_moved_to_another_repository_or_id_opens_nothing() {
        let (slots, _) = KeySlots::create([1; 16], &phrase("p"), FAST, 0).unwrap();
        let mut moved = slots.clone();
        moved.repo_id = [2; 16];
        assert!(moved.unlock(&phrase("p")).is_none());
        let mut renumbered = slots.clone();
        renumbered.slots[0].id = 5;
        assert!(renumbered.unlock(&phrase("p")).is_none());
        let mut cheaper = slots;
        if let SlotKind::Passphrase { params, .. } = &mut cheaper.slots[0].kind {
            params.iterations = 2;
        }
        assert!(cheaper.unlock(&phrase("p")).is_none(), "the parameters are bound too");
    }

    #[test]
    fn damaged_or_hostile_key_files_are_named_errors() {
        let (slots, _) = KeySlots::create([3; 16], &phrase("p"), FAST, 0).unwrap();
        let text = slots.render();
        assert_eq!(KeySlots::parse(&text).unwrap(), slots);
        let flipped = text.replacen("format = 1", "format = 2", 1);
        assert!(KeySlots::parse(&flipped).unwrap_err().contains("checksum"));
        let with_sum = |body: &str| format!("{body}checksum = \"crc32c:{:08x}\"\n", crc32c::crc32c(body.as_bytes()));
        let body = text[..text.rfind("checksum").unwrap()].to_string();
        assert!(KeySlots::parse(&with_sum(&body.replacen("format = 1", "format = 2", 1)))
            .unwrap_err()
            .contains("use a newer strata"));
        let huge = body.replacen(" m=64 ", &format!(" m={} ", u64::from(KdfParams::MAX_MEMORY_KIB) + 1), 1);
        assert!(
            KeySlots::parse(&with_sum(&huge)).unwrap_err().contains("outside"),
            "no unbounded allocation from a slot"
        );
        let spin = body.replacen(" t=1 ", " t=4000000000 ", 1);
        assert!(KeySlots::parse(&with_sum(&spin)).unwrap_err().contains("outside"));
        let slot_line = body.lines().find(|l| l.starts_with("slot = ")).unwrap();
        let twice = body.clone() + slot_line + "\n";
        assert!(KeySlots::parse(&with_sum(&twice)).unwrap_err().contains("appears twice"));
        let none: String = body.lines().filter(|l| !l.starts_with("slot")).map(|l| format!("{l}\n")).collect();
        assert!(KeySlots::parse(&with_sum(&none)).unwrap_err().contains("0 key slots"));
        for cut in 0..text.len() {
            let _ = KeySlots::parse(&text[..cut]);
        }
    }

    #[test]
    fn key_files_hold_exactly_32_bytes_and_passphrases_are_not_empty() {
        assert!(Secret::key_file(&[0; 31]).unwrap_err().contains("exactly 32 bytes"));
        assert!(Secret::key_file(&[0; 32]).is_ok());
        assert!(Secret::passphrase(Vec::new()).is_err());
        assert_eq!(format!("{:?}", phrase("secret")), "Secret::Passphrase(..)");
    }

    #[test]
    fn derived_keys_differ_by_purpose_and_by_image() {
        let (_, master) = KeySlots::create([0; 16], &phrase("p"), FAST, 0).unwrap();
        let (_, other) = KeySlots::create([0; 16], &phrase("p"), FAST, 0).unwrap();
        assert_ne!(*master.0, *other.0, "every repository draws its own master key");
        assert_ne!(*master.block_hash_key(), *other.block_hash_key());
        assert_ne!(master.block_hash_key()[..], master.0[..]);
        let mut frame = b"the same bytes".to_vec();
        master.image_seal(&[1; 32]).seal_frame(512, &mut frame);
        let mut again = b"the same bytes".to_vec();
        master.image_seal(&[2; 32]).seal_frame(512, &mut again);
        assert_ne!(frame, again, "another salt, another image key");
        assert!(master.image_seal(&[1; 32]).open_frame(512, &mut frame).is_ok());
    }
}
