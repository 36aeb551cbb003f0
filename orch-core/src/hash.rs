//! A hash whose value never changes between builds, platforms or Rust versions, for names that
//! are derived from content and must stay the same after a restart (a revision named by its
//! template, an event named by what it says). Not for hash tables facing untrusted keys.

/// FNV-1a, 64 bits, over `bytes`.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// [`stable_hash`] of several parts, each followed by a separator byte so `("ab", "c")` and
/// `("a", "bc")` differ.
pub fn stable_hash_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut buf = Vec::new();
    for p in parts {
        buf.extend_from_slice(p);
        buf.push(0xff);
    }
    stable_hash(&buf)
}

/// Ten lowercase letters and digits for a hash, usable inside a DNS-1123 name; vowels are left
/// out so that no word is spelt by accident.
pub fn short_name(hash: u64) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h = hash;
    (0..10)
        .map(|_| {
            let c = ALPHABET[(h % ALPHABET.len() as u64) as usize] as char;
            h /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_fixed() {
        // The published FNV-1a test vectors: a change of algorithm would rename every revision.
        assert_eq!(stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(stable_hash_parts([&b"ab"[..], b"c"]), stable_hash_parts([&b"a"[..], b"bc"]));
        let n = short_name(stable_hash(b"template"));
        assert_eq!(n.len(), 10);
        assert!(n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
    }
}
