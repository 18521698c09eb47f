//! What a connection's queues (the live queue in `hub`, the outbound one in
//! `outbox`) do so that an idle connection holds no buffer: tens of
//! thousands of them would each carry one.

use std::collections::VecDeque;

/// Past this many slots an emptied queue gives its buffer back; below, a
/// busy queue keeps it rather than allocate again for the next frame.
const IDLE_SLOTS: usize = 8;

/// The front of `deque`; the one that empties a deque grown past
/// [`IDLE_SLOTS`] frees its buffer.
pub fn pop_front<T>(deque: &mut VecDeque<T>) -> Option<T> {
    let item = deque.pop_front()?;
    if deque.is_empty() && deque.capacity() > IDLE_SLOTS {
        *deque = VecDeque::new();
    }
    Some(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emptied_deque_gives_back_a_grown_buffer_only() {
        let mut small: VecDeque<u32> = (0..3).collect();
        let kept = small.capacity();
        while pop_front(&mut small).is_some() {}
        assert_eq!(small.capacity(), kept);
        let mut grown: VecDeque<u32> = (0..40).collect();
        assert_eq!(pop_front(&mut grown), Some(0));
        assert!(grown.capacity() >= 39, "not before it is empty");
        while pop_front(&mut grown).is_some() {}
        assert_eq!(grown.capacity(), 0);
    }
}
