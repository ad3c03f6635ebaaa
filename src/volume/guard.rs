//! A per-key in-flight guard: a second concurrent operation on the same volume (or the same
//! CreateVolume name) gets `Aborted` instead of racing the first.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

#[derive(Default, Clone)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation runs; leaving scope releases the key.
pub struct InFlightGuard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    pub fn try_enter(&self, key: &str) -> Option<InFlightGuard> {
        let mut set = self.keys.lock().unwrap();
        if !set.insert(key.to_string()) {
            return None;
        }
        Some(InFlightGuard {
            keys: self.keys.clone(),
            key: key.to_string(),
        })
    }

    pub fn len(&self) -> usize {
        self.keys.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.keys.lock().unwrap().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_entry_for_the_same_key_is_refused_until_the_first_leaves() {
        let f = InFlight::default();
        let g = f.try_enter("v1").unwrap();
        assert!(f.try_enter("v1").is_none());
        assert!(f.try_enter("v2").is_some());
        drop(g);
        assert!(f.try_enter("v1").is_some());
    }
}
