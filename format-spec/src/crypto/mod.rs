//! The keys of an encrypted repository and everything sealed with them (SPEC.md §8).
//!
//! `keys` owns the key slots file `strata.keys`: a random master key, wrapped once per
//! passphrase (through Argon2id) or key file, so that passphrases are added, removed and changed
//! without rewriting an image. `MasterKey` derives every other key, each for one purpose, so
//! that no key is ever used in two constructions: the keyed block hash (change detection,
//! deduplication, the source digest) and, per image file, an image key from that file's random
//! salt. `seal` owns what is done with an image key: XChaCha20-Poly1305 over frames and the
//! sealed header, with nonces made from a domain byte and a position inside the file (an image key
//! seals each position once, and a new file is a new salt), and BLAKE3 MACs over the index.
//!
//! Key material is zeroed when dropped and never printed (`Debug` shows nothing of it).

pub mod keys;
pub mod seal;

pub use keys::{KdfParams, KeySlots, MasterKey, Secret, SlotKind};
pub use seal::{ImageSeal, Unauthentic};

/// Fills `out` from the operating system's random source.
pub(crate) fn random(out: &mut [u8]) {
    getrandom::getrandom(out).expect("the operating system's random source failed");
}
