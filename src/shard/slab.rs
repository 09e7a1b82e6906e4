//! A slab of connections addressed by generation-tagged ids: when a slot is freed its
//! generation advances, so an id held by a stale timer or a late cross-shard message never
//! reaches the slot's next occupant (SPEC 2).

/// Index and generation of a slab slot. Small and `Copy`, cheap to put in messages and timers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub index: u32,
    pub generation: u32,
}

enum Entry<T> {
    Occupied { generation: u32, value: T },
    Vacant { generation: u32 },
}

/// Generation-checked slab with a bounded capacity.
pub struct Slab<T> {
    entries: Vec<Entry<T>>,
    free: Vec<u32>,
    len: usize,
    capacity: usize,
}

impl<T> Slab<T> {
    /// A slab that holds at most `capacity` values.
    pub fn new(capacity: usize) -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
            len: 0,
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `value`; `Err(value)` when the slab is full.
    pub fn insert(&mut self, value: T) -> Result<ConnId, T> {
        if self.len >= self.capacity {
            return Err(value);
        }
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                let Ok(i) = u32::try_from(self.entries.len()) else {
                    return Err(value);
                };
                self.entries.push(Entry::Vacant { generation: 0 });
                i
            }
        };
        let slot = &mut self.entries[index as usize];
        let generation = match slot {
            Entry::Vacant { generation } => *generation,
            // Free-list invariant: only vacant slots are on it.
            Entry::Occupied { .. } => unreachable!("free list holds an occupied slot"),
        };
        *slot = Entry::Occupied { generation, value };
        self.len += 1;
        Ok(ConnId { index, generation })
    }

    pub fn get(&self, id: ConnId) -> Option<&T> {
        match self.entries.get(id.index as usize)? {
            Entry::Occupied { generation, value } if *generation == id.generation => Some(value),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut T> {
        match self.entries.get_mut(id.index as usize)? {
            Entry::Occupied { generation, value } if *generation == id.generation => Some(value),
            _ => None,
        }
    }

    pub fn contains(&self, id: ConnId) -> bool {
        self.get(id).is_some()
    }

    /// Frees the slot and advances its generation.
    pub fn remove(&mut self, id: ConnId) -> Option<T> {
        let slot = self.entries.get_mut(id.index as usize)?;
        match slot {
            Entry::Occupied { generation, .. } if *generation == id.generation => {
                let next = Entry::Vacant {
                    generation: generation.wrapping_add(1),
                };
                let Entry::Occupied { value, .. } = std::mem::replace(slot, next) else {
                    unreachable!("matched occupied above")
                };
                self.free.push(id.index);
                self.len -= 1;
                Some(value)
            }
            _ => None,
        }
    }

    /// Starts loading the slot of `id` into the cache (a hint with no effect on the result):
    /// a loop over many ids asks for the slots a few ids ahead of the one it works on.
    #[inline]
    pub fn prefetch(&self, id: ConnId) {
        if let Some(e) = self.entries.get(id.index as usize) {
            let start = (e as *const Entry<T>).cast::<u8>();
            for line in (0..std::mem::size_of::<Entry<T>>()).step_by(64) {
                prefetch(start.wrapping_add(line));
            }
        }
    }

    /// Ids of every occupied slot (for drain).
    pub fn ids(&self) -> Vec<ConnId> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e {
                Entry::Occupied { generation, .. } => Some(ConnId {
                    index: i as u32,
                    generation: *generation,
                }),
                Entry::Vacant { .. } => None,
            })
            .collect()
    }
}

/// Asks the CPU to start loading the cache line at `p` (a hint: nothing observable changes,
/// any address is allowed).
#[inline(always)]
#[allow(unsafe_code)]
pub fn prefetch<T>(p: *const T) {
    // SAFETY: SSE is part of x86_64's baseline, and a prefetch reads nothing the program
    // sees: it neither dereferences `p` architecturally nor faults on a bad address.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_ids_never_reach_new_occupants() {
        let mut s = Slab::new(2);
        let a = s.insert("a").unwrap();
        assert_eq!(s.remove(a), Some("a"));
        let b = s.insert("b").unwrap();
        assert_eq!(b.index, a.index);
        assert_ne!(b.generation, a.generation);
        assert_eq!(s.get(a), None);
        assert_eq!(s.remove(a), None);
        assert_eq!(s.get(b), Some(&"b"));
    }

    #[test]
    fn capacity_is_a_bound() {
        let mut s = Slab::new(1);
        s.insert(1).unwrap();
        assert_eq!(s.insert(2), Err(2));
        assert_eq!(s.len(), 1);
    }
}
