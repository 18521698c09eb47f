//! Locks over state that a panic cannot leave half-changed.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, ignoring poisoning. Only for state whose every critical
/// section is one step (a push or pop, a lookup, an insert or remove, a few
/// counters): a panic inside cannot leave it inconsistent, so a poisoned
/// lock is as good as any, and no client can make a service panic by it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_gives_its_state() {
        let mutex = std::sync::Arc::new(Mutex::new(1));
        let held = mutex.clone();
        let _ = std::thread::spawn(move || {
            let _guard = held.lock();
            panic!("poisons the lock");
        })
        .join();
        assert!(mutex.is_poisoned());
        *lock(&mutex) += 1;
        assert_eq!(*lock(&mutex), 2);
    }
}
