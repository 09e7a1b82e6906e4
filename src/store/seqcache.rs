//! Last-seq cache: the last `inbox_seq`/`gseq` of recently used inboxes and timelines, so an
//! append does not read the database. Two generations approximate LRU at hash-map cost: hits in
//! the old generation move to the new one, and when the new one is full the old one is dropped.
//! At most `2 × half` entries.

use super::keys::FastMap;

pub struct SeqCache {
    young: FastMap<Vec<u8>, u64>,
    old: FastMap<Vec<u8>, u64>,
    half: usize,
}

impl SeqCache {
    /// A cache of at most `capacity` entries (at least 2).
    pub fn new(capacity: usize) -> Self {
        SeqCache {
            young: FastMap::default(),
            old: FastMap::default(),
            half: (capacity / 2).max(1),
        }
    }

    pub fn get(&mut self, key: &[u8]) -> Option<u64> {
        if let Some(&v) = self.young.get(key) {
            return Some(v);
        }
        let (k, v) = self.old.remove_entry(key)?;
        self.insert(k, v);
        Some(v)
    }

    pub fn insert(&mut self, key: Vec<u8>, seq: u64) {
        if self.young.len() >= self.half && !self.young.contains_key(&key) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, seq);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_keeps_recent() {
        let mut c = SeqCache::new(4);
        for i in 0u8..10 {
            c.insert(vec![i], u64::from(i));
            assert!(c.len() <= 4);
        }
        assert_eq!(c.get(&[9]), Some(9));
        assert_eq!(c.get(&[8]), Some(8));
        assert_eq!(c.get(&[0]), None);
        c.insert(vec![9], 99);
        assert_eq!(c.get(&[9]), Some(99));
    }
}
