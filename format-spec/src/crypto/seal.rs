//! What one image key seals (SPEC.md §8.2): XChaCha20-Poly1305 over each stored frame and over
//! the header's sealed part, and BLAKE3 MACs over the index.
//!
//! Nonces are never stored: a nonce is a domain byte (frame, header) and the byte position in
//! the image file of what it seals. Within one file no two frames start at one position and the
//! header is sealed once, and every file written (a backup, a merge) draws a new salt and so a
//! new image key: no nonce repeats under a key. Binding the position into the nonce also means
//! that a frame moved within the file, or into another file, does not open.
//!
//! XChaCha20-Poly1305 rather than AES-256-GCM: RustCrypto's XChaCha20-Poly1305 seals and opens
//! faster than its AES-256-GCM even on CPUs with AES instructions
//! (`cargo run --release -p strata-format --example seal_speed`), runs in constant time without
//! them, and its 24-byte nonces leave room for random ones where a position cannot serve (the
//! key slots).

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// Bytes an AEAD seal adds: the tag.
pub const TAG_LEN: usize = 16;
/// Bytes of an index MAC.
pub const MAC_LEN: usize = 16;

const DOMAIN_FRAME: u8 = b'F';
const DOMAIN_HEADER: u8 = b'H';
const CONTEXT_AEAD: &str = "strata 2026-12-04 image XChaCha20-Poly1305 key";
const CONTEXT_MAC: &str = "strata 2026-12-04 image index MAC key";

/// Sealed bytes that do not open: tampered, moved, from another image or another repository,
/// or opened with another key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("its seal does not open with this repository's key (tampered, moved, or from another image)")]
pub struct Unauthentic;

/// The keys of one image file.
pub struct ImageSeal {
    aead: XChaCha20Poly1305,
    mac_key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for ImageSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImageSeal(..)")
    }
}

impl ImageSeal {
    pub(crate) fn new(image_key: Zeroizing<[u8; 32]>) -> ImageSeal {
        let aead_key = Zeroizing::new(blake3::derive_key(CONTEXT_AEAD, &image_key[..]));
        let mac_key = Zeroizing::new(blake3::derive_key(CONTEXT_MAC, &image_key[..]));
        ImageSeal { aead: XChaCha20Poly1305::new((&*aead_key).into()), mac_key }
    }

    fn nonce(domain: u8, position: u64) -> [u8; 24] {
        let mut nonce = [0u8; 24];
        nonce[0] = domain;
        nonce[16..].copy_from_slice(&position.to_le_bytes());
        nonce
    }

    /// Seals the frame that will be stored at byte `position` of the file, in place: `bytes`
    /// grows by `TAG_LEN`.
    pub fn seal_frame(&self, position: u64, bytes: &mut Vec<u8>) {
        self.seal(DOMAIN_FRAME, position, b"", bytes);
    }

    /// Opens, in place, the frame stored at byte `position`; returns the plain bytes (all but
    /// the last `TAG_LEN`).
    pub fn open_frame<'b>(&self, position: u64, sealed: &'b mut [u8]) -> Result<&'b mut [u8], Unauthentic> {
        self.open(DOMAIN_FRAME, position, b"", sealed)
    }

    /// Seals the header's private fields, with the plain header bytes as associated data, so
    /// that any change to the header breaks the seal.
    pub fn seal_header(&self, plain_header: &[u8], private: &mut Vec<u8>) {
        self.seal(DOMAIN_HEADER, 0, plain_header, private);
    }

    /// Opens what `seal_header` sealed, given the same plain header bytes.
    pub fn open_header<'b>(&self, plain_header: &[u8], sealed: &'b mut [u8]) -> Result<&'b mut [u8], Unauthentic> {
        self.open(DOMAIN_HEADER, 0, plain_header, sealed)
    }

    /// The MAC of chunk `chunk` of the index (its entries' bytes).
    pub fn index_chunk_mac(&self, chunk: u64, entries: &[u8]) -> [u8; MAC_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.mac_key);
        h.update(b"index chunk\0").update(&chunk.to_le_bytes()).update(entries);
        truncate(h.finalize())
    }

    /// The MAC over the footer's bytes and the table of chunk MACs.
    pub fn footer_mac(&self, footer: &[u8], chunk_macs: &[u8]) -> [u8; MAC_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.mac_key);
        h.update(b"footer\0").update(&(footer.len() as u64).to_le_bytes()).update(footer).update(chunk_macs);
        truncate(h.finalize())
    }

    fn seal(&self, domain: u8, position: u64, ad: &[u8], bytes: &mut Vec<u8>) {
        let tag = self
            .aead
            .encrypt_in_place_detached(&Self::nonce(domain, position).into(), ad, bytes)
            .expect("XChaCha20-Poly1305 seals any length strata writes");
        bytes.extend_from_slice(&tag);
    }

    fn open<'b>(
        &self,
        domain: u8,
        position: u64,
        ad: &[u8],
        sealed: &'b mut [u8],
    ) -> Result<&'b mut [u8], Unauthentic> {
        let plain_len = sealed.len().checked_sub(TAG_LEN).ok_or(Unauthentic)?;
        let (plain, tag) = sealed.split_at_mut(plain_len);
        let tag = *Tag::from_slice(tag);
        self.aead
            .decrypt_in_place_detached(&Self::nonce(domain, position).into(), ad, plain, &tag)
            .map_err(|_| Unauthentic)?;
        Ok(plain)
    }
}

/// Whether two MACs are equal, in time that does not depend on where they differ.
pub fn macs_equal(a: &[u8; MAC_LEN], b: &[u8; MAC_LEN]) -> bool {
    a.ct_eq(b).into()
}

fn truncate(hash: blake3::Hash) -> [u8; MAC_LEN] {
    hash.as_bytes()[..MAC_LEN].try_into().expect("a BLAKE3 hash is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seal(key: u8) -> ImageSeal {
        ImageSeal::new(Zeroizing::new([key; 32]))
    }

    #[test]
    fn a_frame_opens_only_at_its_position_with_its_image_key_and_untouched() {
        let plain = b"block bytes, compressed".to_vec();
        let mut sealed = plain.clone();
        seal(1).seal_frame(4096, &mut sealed);
        assert_eq!(sealed.len(), plain.len() + TAG_LEN);
        assert!(!sealed.windows(5).any(|w| w == b"block"), "the bytes are not there in the clear");
        assert_eq!(seal(1).open_frame(4096, &mut sealed.clone()).unwrap(), &plain[..]);
        assert_eq!(seal(1).open_frame(8192, &mut sealed.clone()), Err(Unauthentic), "moved within the image");
        assert_eq!(seal(2).open_frame(4096, &mut sealed.clone()), Err(Unauthentic), "another image");
        for bit in 0..sealed.len() * 8 {
            let mut flipped = sealed.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(seal(1).open_frame(4096, &mut flipped), Err(Unauthentic), "bit {bit}");
        }
        assert_eq!(
            seal(1).open_frame(4096, &mut sealed[..TAG_LEN - 1].to_vec()),
            Err(Unauthentic),
            "shorter than a tag"
        );
    }

    #[test]
    fn the_sealed_header_part_is_bound_to_the_plain_header() {
        let header = [9u8; 64];
        let mut private = b"label and source".to_vec();
        seal(1).seal_header(&header, &mut private);
        assert!(seal(1).open_header(&header, &mut private.clone()).is_ok());
        let mut changed = header;
        changed[10] ^= 1;
        assert_eq!(seal(1).open_header(&changed, &mut private.clone()), Err(Unauthentic));
        let mut as_frame = private.clone();
        assert_eq!(seal(1).open_frame(0, &mut as_frame), Err(Unauthentic), "domains differ");
    }

    #[test]
    fn index_macs_bind_the_chunk_number_the_bytes_and_the_key() {
        let entries = [5u8; 4096];
        let mac = seal(1).index_chunk_mac(3, &entries);
        assert!(macs_equal(&mac, &seal(1).index_chunk_mac(3, &entries)));
        assert!(!macs_equal(&mac, &seal(1).index_chunk_mac(4, &entries)));
        assert!(!macs_equal(&mac, &seal(2).index_chunk_mac(3, &entries)));
        let mut changed = entries;
        changed[4000] ^= 0x80;
        assert!(!macs_equal(&mac, &seal(1).index_chunk_mac(3, &changed)));
        let footer = seal(1).footer_mac(&[1; 124], &mac);
        assert!(!macs_equal(&footer, &seal(1).footer_mac(&[1; 124], &[0; MAC_LEN])));
    }
}
