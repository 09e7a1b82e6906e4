//! Key layout (docs/STORE.md): ids are length-prefixed (u16 big-endian), integers big-endian,
//! so every (tenant, id) prefix is prefix-free and the rows under it scan in numeric order.

use super::{GroupRef, UserRef, MAX_ID_BYTES};

/// A fast keyed hasher for the store's in-memory maps (the batch's pending writes, the
/// last-seq cache, the recent dedupe keys): a multiply-mix over 8-byte words, seeded once per
/// process from the standard library's random keys, so the layout of the maps is not
/// predictable from outside. SipHash cost a measurable share of every append (docs/STORE.md).
#[derive(Clone, Copy)]
pub struct FastHasher(u64);

const MIX: u64 = 0x9E37_79B9_7F4A_7C15;

impl FastHasher {
    #[inline]
    fn word(&mut self, w: u64) {
        let m = u128::from(self.0 ^ w) * u128::from(MIX);
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }
}

impl std::hash::Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            self.word(u64::from_le_bytes(b));
        }
        let rest = chunks.remainder();
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        // The length goes in with the tail: "a" and "a\0" differ.
        self.word(u64::from_le_bytes(b) ^ ((bytes.len() as u64) << 56));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.word(i);
    }

    #[inline]
    fn finish(&self) -> u64 {
        // One more round so that the last word's high bits reach the low ones.
        let m = u128::from(self.0) * u128::from(MIX ^ 0xA076_1D64_78BD_642F);
        (m as u64) ^ ((m >> 64) as u64)
    }
}

/// Builds [`FastHasher`]s with this process's seed.
#[derive(Clone, Copy)]
pub struct FastState(u64);

impl Default for FastState {
    fn default() -> Self {
        use std::hash::BuildHasher;
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        FastState(
            *SEED.get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(0u64)),
        )
    }
}

impl std::hash::BuildHasher for FastState {
    type Hasher = FastHasher;
    #[inline]
    fn build_hasher(&self) -> FastHasher {
        FastHasher(self.0)
    }
}

/// A hash map on [`FastState`].
pub type FastMap<K, V> = std::collections::HashMap<K, V, FastState>;

/// An id too long for its u16 length prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong;

/// Appends `s` with its u16 big-endian length.
pub fn put_id(k: &mut Vec<u8>, s: &str) -> Result<(), TooLong> {
    let len = u16::try_from(s.len()).map_err(|_| TooLong)?;
    debug_assert!(s.len() <= MAX_ID_BYTES);
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(s.as_bytes());
    Ok(())
}

/// `tenant ‖ user`: the prefix of a user's inbox, cursors and memberships.
pub fn user(u: &UserRef) -> Result<Vec<u8>, TooLong> {
    let mut k = Vec::with_capacity(4 + u.tenant.len() + u.user.len() + 8);
    put_id(&mut k, &u.tenant)?;
    put_id(&mut k, &u.user)?;
    Ok(k)
}

/// `tenant ‖ group`: the prefix of a group's timeline, members and member cursors.
pub fn group(g: &GroupRef) -> Result<Vec<u8>, TooLong> {
    let mut k = Vec::with_capacity(4 + g.tenant.len() + g.group.len() + 8);
    put_id(&mut k, &g.tenant)?;
    put_id(&mut k, &g.group)?;
    Ok(k)
}

/// `prefix ‖ seq` (big-endian).
pub fn with_seq(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `prefix ‖ name`: the name takes the rest of the key (devices, members, groups).
pub fn with_name(prefix: &[u8], name: &str) -> Result<Vec<u8>, TooLong> {
    if name.len() > MAX_ID_BYTES {
        return Err(TooLong);
    }
    let mut k = Vec::with_capacity(prefix.len() + name.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(name.as_bytes());
    Ok(k)
}

/// The seq at the end of a `prefix ‖ seq` key.
pub fn seq_suffix(key: &[u8]) -> Option<u64> {
    let tail = key.len().checked_sub(8).map(|i| &key[i..])?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

/// Destination of a dedupe record.
#[derive(Clone, Copy)]
pub enum Dest<'a> {
    Inbox(&'a str),
    Group(&'a str),
}

/// `tenant ‖ sender ‖ cmid ‖ kind ‖ destination`.
pub fn dedupe(tenant: &str, sender: &str, cmid: &str, dest: Dest<'_>) -> Result<Vec<u8>, TooLong> {
    let mut k = Vec::with_capacity(8 + tenant.len() + sender.len() + cmid.len() + 24);
    put_id(&mut k, tenant)?;
    put_id(&mut k, sender)?;
    put_id(&mut k, cmid)?;
    let (kind, id) = match dest {
        Dest::Inbox(u) => (b'u', u),
        Dest::Group(g) => (b'g', g),
    };
    k.push(kind);
    put_id(&mut k, id)?;
    Ok(k)
}

/// A dedupe record's value: the original result and when it was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupeRecord {
    pub seq: u64,
    pub mid: u64,
    pub ts: u64,
    pub stored_at_ms: u64,
}

impl DedupeRecord {
    pub fn encode(&self) -> [u8; 32] {
        let mut v = [0u8; 32];
        v[0..8].copy_from_slice(&self.seq.to_be_bytes());
        v[8..16].copy_from_slice(&self.mid.to_be_bytes());
        v[16..24].copy_from_slice(&self.ts.to_be_bytes());
        v[24..32].copy_from_slice(&self.stored_at_ms.to_be_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Option<DedupeRecord> {
        let v: &[u8; 32] = v.try_into().ok()?;
        let at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[i..i + 8]);
            u64::from_be_bytes(b)
        };
        Some(DedupeRecord {
            seq: at(0),
            mid: at(8),
            ts: at(16),
            stored_at_ms: at(24),
        })
    }
}

/// A u64 value (cursors, member counts).
pub fn decode_u64(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_prefix_free_and_seqs_sort() {
        let a = user(&UserRef::new("t", "ab")).unwrap();
        let b = user(&UserRef::new("t", "abc")).unwrap();
        assert!(!b.starts_with(&a) && !a.starts_with(&b));
        let k1 = with_seq(&a, 9);
        let k2 = with_seq(&a, 256);
        assert!(k1 < k2);
        assert_eq!(seq_suffix(&k2), Some(256));
        let long = "x".repeat(MAX_ID_BYTES + 1);
        assert_eq!(user(&UserRef::new("t", long.as_str())), Err(TooLong));
    }

    #[test]
    fn dedupe_record_roundtrips() {
        let r = DedupeRecord {
            seq: 1,
            mid: u64::MAX,
            ts: 3,
            stored_at_ms: 4,
        };
        assert_eq!(DedupeRecord::decode(&r.encode()), Some(r));
        assert_eq!(DedupeRecord::decode(&[0; 31]), None);
    }
}
