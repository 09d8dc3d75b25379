//! [`BoundedSet`]: the one bounded memory of "seen before" in the core (signal ids, settled
//! dispatches, the pipeline's event ids and seqs). The oldest entry is forgotten first.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;

/// A set that keeps at most `cap` entries, forgetting the oldest first.
#[derive(Clone, Debug)]
pub struct BoundedSet<K> {
    set: HashSet<K>,
    order: VecDeque<K>,
    cap: usize,
}

impl<K: Clone + Eq + Hash> BoundedSet<K> {
    /// An empty set keeping at most `cap` entries (at least one).
    pub fn new(cap: usize) -> Self {
        Self { set: HashSet::new(), order: VecDeque::new(), cap: cap.max(1) }
    }

    /// Remembers `key`; false if it was already there (nothing changes then).
    pub fn insert(&mut self, key: K) -> bool {
        if self.set.contains(&key) {
            return false;
        }
        self.set.insert(key.clone());
        self.order.push_back(key);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    /// Whether `key` is remembered.
    pub fn contains<Q>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.set.contains(key)
    }

    /// Forgets `key` (rare; O(n)).
    pub fn remove<Q>(&mut self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if self.set.remove(key) {
            self.order.retain(|x| x.borrow() != key);
            true
        } else {
            false
        }
    }

    /// The entries, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &K> {
        self.order.iter()
    }

    /// How many are remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The most it keeps.
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_and_forgets_the_oldest_first() {
        let mut s = BoundedSet::new(3);
        assert!(s.insert("a".to_owned()) && s.insert("b".to_owned()) && s.insert("c".to_owned()));
        assert!(!s.insert("a".to_owned()), "already there");
        assert!(s.insert("d".to_owned()));
        assert!(!s.contains("a") && s.contains("b") && s.contains("d"));
        assert_eq!(s.iter().cloned().collect::<Vec<_>>(), ["b", "c", "d"]);
        assert!(s.remove("c") && !s.remove("c"));
        assert_eq!((s.len(), s.capacity()), (2, 3));
        let mut z = BoundedSet::new(0);
        z.insert(1u64);
        z.insert(2u64);
        assert_eq!(z.iter().copied().collect::<Vec<_>>(), [2]);
    }
}
