//! A bounded map for caches: two generations approximate LRU at hash-map cost. Hits in the old
//! generation move to the young one; when the young one is full, the old one is dropped and
//! the young one becomes old. At most `2 × half` entries. The store's last-seq cache and the
//! cluster's route caches are this map.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};

pub struct TwoGen<K, V, S = std::collections::hash_map::RandomState> {
    young: HashMap<K, V, S>,
    old: HashMap<K, V, S>,
    half: usize,
}

impl<K: Hash + Eq, V, S: BuildHasher + Default> TwoGen<K, V, S> {
    /// A map of at most `capacity` entries (at least 2).
    pub fn new(capacity: usize) -> Self {
        TwoGen {
            young: HashMap::default(),
            old: HashMap::default(),
            half: (capacity / 2).max(1),
        }
    }

    /// The entry of `key`, moved to the young generation.
    pub fn get<Q>(&mut self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if !self.young.contains_key(key) {
            let (k, v) = self.old.remove_entry(key)?;
            self.insert(k, v);
        }
        self.young.get(key)
    }

    pub fn insert(&mut self, key: K, value: V) {
        if self.young.len() >= self.half && !self.young.contains_key(&key) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, value);
    }

    pub fn remove<Q>(&mut self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.young.remove(key);
        self.old.remove(key);
    }

    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.young.is_empty() && self.old.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_keeps_recent() {
        let mut c: TwoGen<Vec<u8>, u64> = TwoGen::new(4);
        for i in 0u8..10 {
            c.insert(vec![i], u64::from(i));
            assert!(c.len() <= 4);
        }
        assert_eq!(c.get(&[9][..]), Some(&9));
        assert_eq!(c.get(&[8][..]), Some(&8));
        assert_eq!(c.get(&[0][..]), None);
        c.insert(vec![9], 99);
        assert_eq!(c.get(&[9][..]), Some(&99));
        c.remove(&[9][..]);
        assert_eq!(c.get(&[9][..]), None);
    }
}
