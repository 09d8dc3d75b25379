//! Hashing of the log: SHA-256 (the chain, the recorded config) and the fleet's
//! fingerprint (a plan names the fleet it used).

use crate::model::Vehicle;

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// `bytes` as lower-case hex (a table lookup per nibble: the log's writer hashes every row).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// A fingerprint of a fleet's states (FNV-1a over their JSON, in id order): equal for
/// equal fleets on every machine.
pub fn fleet_fingerprint<'a>(fleet: impl IntoIterator<Item = &'a Vehicle>) -> String {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    for v in fleet {
        // Serializing a vehicle cannot fail (no maps with non-string keys).
        if let Ok(bytes) = serde_json::to_vec(v) {
            h.write(&bytes);
        }
        h.write(b"\n");
    }
    format!("{:016x}", h.0)
}

struct Fnv(u64);

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}
