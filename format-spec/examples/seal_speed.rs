//! Seals and opens 4 MiB frames with XChaCha20-Poly1305 (what strata uses) and AES-256-GCM, in
//! the same go, alternating, and prints the median MB/s of each; then times one Argon2id run
//! with strata's default parameters. `cargo run --release -p strata-format --example seal_speed`

use std::time::Instant;

use aes_gcm::aead::{AeadInPlace, KeyInit};
use strata_format::crypto::KdfParams;

const FRAME: usize = 4 << 20;
const ROUNDS: usize = 9;
const FRAMES_PER_ROUND: usize = 32;

fn rate(mut run: impl FnMut()) -> f64 {
    let t = Instant::now();
    run();
    2.0 * (FRAME * FRAMES_PER_ROUND) as f64 / t.elapsed().as_secs_f64() / 1e6
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let key = [7u8; 32];
    let xchacha = chacha20poly1305::XChaCha20Poly1305::new(&key.into());
    let aes = aes_gcm::Aes256Gcm::new(&key.into());
    let mut buf = vec![0x5au8; FRAME];
    let (mut x, mut a) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        x.push(rate(|| {
            for i in 0..FRAMES_PER_ROUND as u64 {
                let mut nonce = [0u8; 24];
                nonce[16..].copy_from_slice(&i.to_le_bytes());
                let tag = xchacha.encrypt_in_place_detached(&nonce.into(), b"", &mut buf).unwrap();
                xchacha.decrypt_in_place_detached(&nonce.into(), b"", &mut buf, &tag).unwrap();
            }
        }));
        a.push(rate(|| {
            for i in 0..FRAMES_PER_ROUND as u64 {
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&i.to_le_bytes());
                let tag = aes.encrypt_in_place_detached(&nonce.into(), b"", &mut buf).unwrap();
                aes.decrypt_in_place_detached(&nonce.into(), b"", &mut buf, &tag).unwrap();
            }
        }));
    }
    let (x, a) = (median(x), median(a));
    println!(
        "seal + open, one core, median of {ROUNDS}: XChaCha20-Poly1305 {x:.0} MB/s, AES-256-GCM {a:.0} MB/s ({:.2}x)",
        x / a
    );
    let KdfParams { memory_kib, iterations, lanes } = KdfParams::DEFAULT;
    let params = argon2::Params::new(memory_kib, iterations, lanes, Some(32)).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut out = [0u8; 32];
    let t = Instant::now();
    argon.hash_password_into(b"a passphrase", b"sixteen byte salt", &mut out).unwrap();
    println!("Argon2id m={memory_kib} KiB t={iterations} p={lanes}: {:.2} s", t.elapsed().as_secs_f64());
}
