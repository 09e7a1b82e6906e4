//! What the stores share beneath the rules: the fast keyed hash of their in-memory maps and the
//! dedupe record's fields.

/// A fast keyed hasher for the stores' in-memory maps (the batch's pending writes, the log
/// store's index and dedupe fingerprints): a multiply-mix over 8-byte words, seeded once per
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

/// A dedupe record's value: the original result and when it was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupeRecord {
    pub seq: u64,
    pub mid: u64,
    pub ts: u64,
    pub stored_at_ms: u64,
}
