//! A single-producer/single-consumer ring over words of shared memory.
//!
//! The ring is a power-of-two number of slots of `slot_words` u64 words each, plus two indices,
//! `tail` (written by the producer) and `head` (written by the consumer), each on its own pair of
//! cache lines. Indices count pushes and pops from zero and wrap at 2^64; a slot is
//! `index & (capacity - 1)`.
//!
//! The peer is another process and is not trusted:
//! - every word of a slot is copied through an atomic load or store ([`AtomicU64`]), so a peer
//!   writing while we read yields garbage values, never undefined behaviour; no `&T` into the
//!   slots is ever formed;
//! - the peer's index is checked on every load: a tail more than `capacity` ahead of our head (or
//!   a head ahead of our tail) is [`RingCorrupt`], and nothing is read or written on its word.
//!
//! Each side keeps a cached copy of the peer's index and reloads it only when the cache says the
//! ring is empty (consumer) or full (producer). Indices are published once per batch:
//! [`Producer::try_push`] and [`Consumer::try_pop`] only move the local index, and
//! [`Producer::publish`] / [`Consumer::release`] store it.
//!
//! # Stamps
//!
//! The producer stores a slot's first word last, with Release: it is the slot's *stamp*. A
//! consumer that knows what the next frame's first word must be (a sequence number, a request
//! id) can use [`Consumer::try_pop_stamped`]: it loads the next slot's stamp (Acquire) and, on a
//! match, takes the frame without waiting for the tail index, saving one cache-line transfer
//! per frame. Slots must start with a stamp no frame carries (`u64::MAX`), so that an
//! unwritten slot never matches.

use crate::sync::{AtomicU64, Ordering};

/// The shared parts of one ring: its two indices and its slots.
#[derive(Clone, Copy)]
pub struct RingView<'a> {
    tail: &'a AtomicU64,
    head: &'a AtomicU64,
    slots: &'a [AtomicU64],
    /// A power of two.
    capacity: u64,
    slot_words: usize,
}

impl core::fmt::Debug for RingView<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RingView")
            .field("capacity", &self.capacity)
            .field("slot_words", &self.slot_words)
            .finish_non_exhaustive()
    }
}

/// The peer's index is out of range: the ring can no longer be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingCorrupt {
    /// Our own index.
    pub ours: u64,
    /// The peer's index as loaded.
    pub theirs: u64,
}

impl core::fmt::Display for RingCorrupt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "ring index out of range: ours {} theirs {}",
            self.ours, self.theirs
        )
    }
}

/// Why a push did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    /// Every slot holds an unconsumed frame.
    Full,
    /// The consumer's index is out of range.
    Corrupt(RingCorrupt),
}

impl<'a> RingView<'a> {
    /// A ring over `slots` (`capacity * slot_words` words) with the given indices.
    ///
    /// Returns `None` when `capacity` is not a power of two, `slot_words` is 0, or `slots` has
    /// the wrong length.
    pub fn new(
        tail: &'a AtomicU64,
        head: &'a AtomicU64,
        slots: &'a [AtomicU64],
        capacity: u32,
        slot_words: usize,
    ) -> Option<Self> {
        if !capacity.is_power_of_two()
            || slot_words == 0
            || slots.len() != capacity as usize * slot_words
        {
            return None;
        }
        Some(Self {
            tail,
            head,
            slots,
            capacity: u64::from(capacity),
            slot_words,
        })
    }

    /// Slots of the ring.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Words of one slot.
    pub fn slot_words(&self) -> usize {
        self.slot_words
    }

    /// Both indices as they are now (tail, head), for observers that neither push nor pop.
    ///
    /// The values are whatever the two processes last stored and may be out of range.
    pub fn load_indices(&self) -> (u64, u64) {
        // SYNC(tail), SYNC(head): Acquire, so an observer that reads slots afterwards sees
        // what the producer published up to this tail.
        (
            self.tail.load(Ordering::Acquire),
            self.head.load(Ordering::Acquire),
        )
    }

    /// Copies slot `index & mask` out, word by word, into `out` (at most one slot).
    pub fn read_slot(&self, index: u64, out: &mut [u64]) {
        self.read_slot_at(index, 0, out);
    }

    /// Copies words `from..` of slot `index & mask` into `out` (as many as both hold); returns
    /// how many.
    pub fn read_slot_at(&self, index: u64, from: usize, out: &mut [u64]) -> usize {
        let start = self.slot_start(index);
        let n = out.len().min(self.slot_words.saturating_sub(from));
        if n == 0 {
            return 0;
        }
        for (dst, src) in out[..n]
            .iter_mut()
            .zip(&self.slots[start + from..start + from + n])
        {
            // Relaxed: the Acquire load of the index that made this slot readable orders it.
            *dst = src.load(Ordering::Relaxed);
        }
        n
    }

    fn write_slot(&self, index: u64, words: &[u64]) {
        let start = self.slot_start(index);
        let slot = &self.slots[start..start + words.len()];
        for (dst, src) in slot[1..].iter().zip(&words[1..]) {
            // Relaxed: the Release store of the stamp below, and of the tail, order it.
            dst.store(*src, Ordering::Relaxed);
        }
        // SYNC(stamp): Release pairs with the Acquire in `Consumer::try_pop_stamped`: the rest
        // of the frame is visible to a consumer that sees this word.
        slot[0].store(words[0], Ordering::Release);
    }

    /// Writes `stamp` into the first word of every slot: the value of a slot never written.
    pub fn clear_stamps(&self, stamp: u64) {
        for slot in self.slots.chunks(self.slot_words) {
            slot[0].store(stamp, Ordering::Relaxed);
        }
    }

    fn slot_start(&self, index: u64) -> usize {
        (index & (self.capacity - 1)) as usize * self.slot_words
    }
}

/// Ring memory on the heap, for tests, benchmarks and models of the protocol (a session's
/// rings live in its shared segment instead).
#[cfg(feature = "std")]
pub struct HeapRing {
    tail: AtomicU64,
    head: AtomicU64,
    slots: std::vec::Vec<AtomicU64>,
    capacity: u32,
    slot_words: usize,
}

#[cfg(feature = "std")]
impl HeapRing {
    /// A zeroed ring of `capacity` slots of `slot_words` words.
    ///
    /// # Panics
    /// When `capacity` is not a power of two or `slot_words` is 0.
    pub fn new(capacity: u32, slot_words: usize) -> Self {
        let ring = Self {
            tail: AtomicU64::new(0),
            head: AtomicU64::new(0),
            slots: (0..capacity as usize * slot_words)
                .map(|_| AtomicU64::new(0))
                .collect(),
            capacity,
            slot_words,
        };
        assert!(ring.try_view().is_some(), "invalid ring geometry");
        ring
    }

    fn try_view(&self) -> Option<RingView<'_>> {
        RingView::new(
            &self.tail,
            &self.head,
            &self.slots,
            self.capacity,
            self.slot_words,
        )
    }

    /// The ring.
    pub fn view(&self) -> RingView<'_> {
        self.try_view().expect("checked in new")
    }

    /// The tail index word, for tests that play a misbehaving producer.
    pub fn tail_word(&self) -> &AtomicU64 {
        &self.tail
    }

    /// The head index word, for tests that play a misbehaving consumer.
    pub fn head_word(&self) -> &AtomicU64 {
        &self.head
    }
}

/// The writing end of a ring.
#[derive(Debug)]
pub struct Producer<'a> {
    ring: RingView<'a>,
    /// Next index to write; published to the shared tail by [`Producer::publish`].
    tail: u64,
    /// Last consumer head we loaded; invariant: `tail - cached_head` in `0..=capacity`.
    cached_head: u64,
}

impl<'a> Producer<'a> {
    /// The producer of a ring that starts empty at index 0.
    pub fn new(ring: RingView<'a>) -> Self {
        Self {
            ring,
            tail: 0,
            cached_head: 0,
        }
    }

    /// Frames pushed so far (published or not).
    pub fn pushed(&self) -> u64 {
        self.tail
    }

    /// Slots free now, reloading the consumer's index.
    ///
    /// # Errors
    /// [`RingCorrupt`] when the consumer's head is not within `capacity` behind our tail.
    pub fn free_slots(&mut self) -> Result<u64, RingCorrupt> {
        self.load_head()?;
        Ok(self.ring.capacity - self.tail.wrapping_sub(self.cached_head))
    }

    /// Frames the consumer has taken, as last loaded.
    pub fn consumed(&mut self) -> Result<u64, RingCorrupt> {
        self.load_head()?;
        Ok(self.cached_head)
    }

    fn load_head(&mut self) -> Result<(), RingCorrupt> {
        // SYNC(head): Acquire pairs with the consumer's Release in `Consumer::release`: the
        // consumer has finished copying every slot before `head`, so they may be overwritten.
        let head = self.ring.head.load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > self.ring.capacity {
            return Err(RingCorrupt {
                ours: self.tail,
                theirs: head,
            });
        }
        self.cached_head = head;
        Ok(())
    }

    /// Writes `words` (at most one slot; the rest of the slot keeps old bytes) into the next
    /// slot without publishing it.
    ///
    /// # Errors
    /// [`PushError::Full`] when no slot is free; [`PushError::Corrupt`] when the consumer's
    /// index is out of range.
    ///
    /// # Panics
    /// When `words` is longer than a slot.
    pub fn try_push(&mut self, words: &[u64]) -> Result<(), PushError> {
        assert!(
            words.len() <= self.ring.slot_words,
            "frame larger than a slot"
        );
        debug_assert!(self.tail.wrapping_sub(self.cached_head) <= self.ring.capacity);
        if self.tail.wrapping_sub(self.cached_head) == self.ring.capacity {
            self.load_head().map_err(PushError::Corrupt)?;
            if self.tail.wrapping_sub(self.cached_head) == self.ring.capacity {
                return Err(PushError::Full);
            }
        }
        self.ring.write_slot(self.tail, words);
        self.tail = self.tail.wrapping_add(1);
        Ok(())
    }

    /// Makes every frame pushed so far visible to the consumer.
    pub fn publish(&mut self) {
        // SYNC(tail): Release pairs with the consumer's Acquire in `Consumer::available`: the
        // slot words stored before are visible to it once it sees this tail.
        self.ring.tail.store(self.tail, Ordering::Release);
    }

    /// [`Producer::try_push`] then [`Producer::publish`].
    ///
    /// # Errors
    /// As [`Producer::try_push`].
    pub fn push(&mut self, words: &[u64]) -> Result<(), PushError> {
        self.try_push(words)?;
        self.publish();
        Ok(())
    }
}

/// The reading end of a ring.
#[derive(Debug)]
pub struct Consumer<'a> {
    ring: RingView<'a>,
    /// Next index to read; published to the shared head by [`Consumer::release`].
    head: u64,
    /// Last producer tail we loaded. Invariant: `cached_tail - head` in `0..=capacity`, or
    /// `head` ahead of it by frames taken on their stamp before the tail covered them.
    cached_tail: u64,
    /// Stamp checks that found no frame, for spacing out tail loads.
    stamp_misses: u32,
}

/// A stamped pop that finds no frame loads the tail once in this many tries (a frame whose
/// stamp is not the expected one still arrives, a little later).
const STAMP_MISSES_PER_TAIL_LOAD: u32 = 64;

impl<'a> Consumer<'a> {
    /// The consumer of a ring that starts empty at index 0.
    pub fn new(ring: RingView<'a>) -> Self {
        Self {
            ring,
            head: 0,
            cached_tail: 0,
            stamp_misses: 0,
        }
    }

    /// Frames popped so far (released or not).
    pub fn popped(&self) -> u64 {
        self.head
    }

    /// Whether the next slot holds a frame stamped `stamp` (published or not yet), without
    /// taking it.
    #[inline]
    pub fn stamped(&self, stamp: u64) -> bool {
        let start = self.ring.slot_start(self.head);
        // SYNC(stamp): Acquire pairs with the producer's Release in `RingView::write_slot`.
        self.ring.slots[start].load(Ordering::Acquire) == stamp
    }

    /// The producer's tail word itself, for a watcher that looks at it without this end (see
    /// [`Consumer::peer_tail`]).
    pub fn tail_word(&self) -> &'a AtomicU64 {
        self.ring.tail
    }

    /// The producer's tail as it is now, unchecked: a hint that frames were published since
    /// it was last seen (a watcher compares it with an earlier value; [`Consumer::available`]
    /// checks it).
    #[inline]
    pub fn peer_tail(&self) -> u64 {
        // SYNC(tail): Acquire pairs with the producer's Release in `Producer::publish`.
        self.ring.tail.load(Ordering::Acquire)
    }

    /// Frames ready to pop, reloading the producer's index.
    ///
    /// # Errors
    /// [`RingCorrupt`] when the producer's tail is behind our head or more than `capacity`
    /// ahead of it.
    pub fn available(&mut self) -> Result<u64, RingCorrupt> {
        // SYNC(tail): Acquire pairs with the producer's Release in `Producer::publish`.
        let tail = self.ring.tail.load(Ordering::Acquire);
        // The tail never moves back, and never more than `capacity` past our head (which may
        // lead the last tail by frames taken on their stamp).
        let progress = tail.wrapping_sub(self.cached_tail);
        let limit = self
            .head
            .wrapping_sub(self.cached_tail)
            .wrapping_add(self.ring.capacity);
        if progress > limit {
            return Err(RingCorrupt {
                ours: self.head,
                theirs: tail,
            });
        }
        self.cached_tail = tail;
        Ok(self.cached_ready())
    }

    /// Frames ready by the cached tail (0 when the head leads it).
    fn cached_ready(&self) -> u64 {
        let ready = self.cached_tail.wrapping_sub(self.head);
        if ready <= self.ring.capacity {
            ready
        } else {
            0
        }
    }

    /// Copies the next frame into `out` (up to one slot) and moves past it, without releasing
    /// the slot. Returns `false` when the ring is empty.
    ///
    /// # Errors
    /// [`RingCorrupt`] when the producer's index is out of range.
    pub fn try_pop(&mut self, out: &mut [u64]) -> Result<bool, RingCorrupt> {
        if self.cached_ready() == 0 && self.available()? == 0 {
            return Ok(false);
        }
        self.ring.read_slot(self.head, out);
        self.head = self.head.wrapping_add(1);
        Ok(true)
    }

    /// As [`Consumer::try_pop`], but when the cached tail says the ring is empty, first looks
    /// at the next slot's stamp: if it is `stamp`, the frame is complete and is taken without
    /// loading the tail (see the module's "Stamps").
    ///
    /// # Errors
    /// [`RingCorrupt`] when the producer's index is out of range.
    pub fn try_pop_stamped(&mut self, stamp: u64, out: &mut [u64]) -> Result<bool, RingCorrupt> {
        if !self.next_ready_stamped(stamp)? {
            return Ok(false);
        }
        self.ring.read_slot(self.head, out);
        self.head = self.head.wrapping_add(1);
        Ok(true)
    }

    /// As [`Consumer::try_pop_stamped`], in two steps: the frame's first `head.len()` words are
    /// copied into `head`; given them, `rest` says where the words after them go (as many as
    /// the slot and that place hold), or `None` to leave them unread. Either way the frame is
    /// popped. Returns the words copied in all (0: the ring is empty).
    ///
    /// # Errors
    /// [`RingCorrupt`] when the producer's index is out of range.
    pub fn try_pop_stamped_with<'d>(
        &mut self,
        stamp: u64,
        head: &mut [u64],
        rest: impl FnOnce(&[u64]) -> Option<&'d mut [u64]>,
    ) -> Result<usize, RingCorrupt> {
        if !self.next_ready_stamped(stamp)? {
            return Ok(0);
        }
        let mut words = self.ring.read_slot_at(self.head, 0, head);
        if let Some(out) = rest(&head[..words]) {
            words += self.ring.read_slot_at(self.head, words, out);
        }
        self.head = self.head.wrapping_add(1);
        Ok(words)
    }

    /// Whether the next frame is ready: by the cached tail, or else by its stamp (the tail
    /// loaded every [`STAMP_MISSES_PER_TAIL_LOAD`] misses).
    #[inline]
    fn next_ready_stamped(&mut self, stamp: u64) -> Result<bool, RingCorrupt> {
        if self.cached_ready() == 0 {
            let start = self.ring.slot_start(self.head);
            // SYNC(stamp): Acquire pairs with the producer's Release in `RingView::write_slot`.
            if self.ring.slots[start].load(Ordering::Acquire) != stamp {
                // The tail is looked at only every STAMP_MISSES_PER_TAIL_LOAD misses: loading
                // it on every spin would pull the producer's index line away from it while it
                // publishes, slowing the very frame we wait for.
                self.stamp_misses = self.stamp_misses.wrapping_add(1);
                if !self.stamp_misses.is_multiple_of(STAMP_MISSES_PER_TAIL_LOAD)
                    || self.available()? == 0
                {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Hands every slot popped so far back to the producer.
    pub fn release(&mut self) {
        // SYNC(head): Release pairs with the producer's Acquire in `Producer::load_head`: our
        // copies of the slots are complete before the producer may overwrite them.
        self.ring.head.store(self.head, Ordering::Release);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::vec::Vec;

    extern crate std;

    fn mem(capacity: u32, slot_words: usize) -> HeapRing {
        HeapRing::new(capacity, slot_words)
    }

    #[test]
    fn push_pop_in_order() {
        let m = mem(4, 2);
        let (mut p, mut c) = (Producer::new(m.view()), Consumer::new(m.view()));
        let mut out = [0u64; 2];
        assert!(!c.try_pop(&mut out).unwrap());
        p.push(&[1, 2]).unwrap();
        p.push(&[3, 4]).unwrap();
        assert!(c.try_pop(&mut out).unwrap());
        assert_eq!(out, [1, 2]);
        assert!(c.try_pop(&mut out).unwrap());
        assert_eq!(out, [3, 4]);
        assert!(!c.try_pop(&mut out).unwrap());
    }

    #[test]
    fn full_until_released() {
        let m = mem(2, 1);
        let (mut p, mut c) = (Producer::new(m.view()), Consumer::new(m.view()));
        p.push(&[1]).unwrap();
        p.push(&[2]).unwrap();
        assert_eq!(p.push(&[3]), Err(PushError::Full));
        let mut out = [0u64];
        assert!(c.try_pop(&mut out).unwrap());
        // Not released yet: the producer still sees the ring full.
        assert_eq!(p.push(&[3]), Err(PushError::Full));
        c.release();
        p.push(&[3]).unwrap();
        assert_eq!(p.free_slots().unwrap(), 0);
    }

    #[test]
    fn unpublished_frames_are_invisible() {
        let m = mem(4, 1);
        let (mut p, mut c) = (Producer::new(m.view()), Consumer::new(m.view()));
        p.try_push(&[9]).unwrap();
        assert_eq!(c.available().unwrap(), 0);
        p.publish();
        assert_eq!(c.available().unwrap(), 1);
    }

    #[test]
    fn wraps_around_many_times() {
        let rounds = if cfg!(miri) { 50 } else { 10_000 };
        let m = mem(4, 3);
        let (mut p, mut c) = (Producer::new(m.view()), Consumer::new(m.view()));
        let mut out = [0u64; 3];
        let mut next = 0u64;
        for i in 0..rounds {
            let n = i % 4 + 1;
            for k in 0..n {
                p.try_push(&[i, k, i ^ k]).unwrap();
            }
            p.publish();
            for k in 0..n {
                assert!(c.try_pop(&mut out).unwrap());
                assert_eq!(out, [i, k, i ^ k]);
                next += 1;
            }
            c.release();
        }
        assert_eq!(c.popped(), next);
    }

    #[test]
    fn wraps_at_the_end_of_the_index_space() {
        let m = mem(4, 1);
        m.tail_word().store(u64::MAX - 1, Ordering::Relaxed);
        m.head_word().store(u64::MAX - 1, Ordering::Relaxed);
        let mut p = Producer {
            ring: m.view(),
            tail: u64::MAX - 1,
            cached_head: u64::MAX - 1,
        };
        let mut c = Consumer {
            ring: m.view(),
            head: u64::MAX - 1,
            cached_tail: u64::MAX - 1,
            stamp_misses: 0,
        };
        for v in 0..3 {
            p.push(&[v]).unwrap();
        }
        let mut out = [0u64];
        for v in 0..3 {
            assert!(c.try_pop(&mut out).unwrap());
            assert_eq!(out[0], v);
        }
        assert_eq!(c.popped(), 1);
    }

    #[test]
    fn corrupt_tail_is_refused() {
        let m = mem(4, 1);
        let mut c = Consumer::new(m.view());
        m.tail_word().store(5, Ordering::Relaxed);
        assert_eq!(c.available(), Err(RingCorrupt { ours: 0, theirs: 5 }));
        // Moving back is corruption too.
        m.tail_word().store(u64::MAX, Ordering::Relaxed);
        let mut out = [0u64];
        assert!(c.try_pop(&mut out).is_err());
    }

    #[test]
    fn stamped_frames_are_taken_before_the_tail_moves() {
        let m = mem(2, 2);
        let ring = m.view();
        ring.clear_stamps(u64::MAX);
        let (mut p, mut c) = (Producer::new(ring), Consumer::new(ring));
        let mut out = [0u64; 2];
        assert!(!c.try_pop_stamped(10, &mut out).unwrap());
        p.try_push(&[10, 1]).unwrap(); // not published
        assert!(!c.try_pop(&mut out).unwrap());
        for _ in 0..2 * STAMP_MISSES_PER_TAIL_LOAD {
            assert!(!c.try_pop_stamped(11, &mut out).unwrap(), "wrong stamp");
        }
        assert!(c.try_pop_stamped(10, &mut out).unwrap());
        assert_eq!(out, [10, 1]);
        c.release();
        p.try_push(&[11, 2]).unwrap();
        assert!(c.try_pop_stamped(11, &mut out).unwrap());
        assert_eq!(out, [11, 2]);
        // The head now leads the (still unpublished) tail: that is not corruption.
        assert_eq!(c.available().unwrap(), 0);
        p.publish();
        assert_eq!(c.available().unwrap(), 0);
        p.push(&[12, 3]).unwrap();
        assert_eq!(c.available().unwrap(), 1);
        assert!(c.try_pop(&mut out).unwrap());
        assert_eq!(out, [12, 3]);
        // A tail behind the last one loaded is corrupt.
        m.tail_word().store(1, Ordering::Relaxed);
        assert!(c.available().is_err());
    }

    #[test]
    fn a_frame_is_popped_by_its_head_and_its_rest_read_where_asked() {
        let m = mem(4, 4);
        let ring = m.view();
        ring.clear_stamps(u64::MAX);
        let (mut p, mut c) = (Producer::new(ring), Consumer::new(ring));
        let mut head = [0u64; 2];
        let mut rest = [0u64; 3];
        assert_eq!(c.try_pop_stamped_with(0, &mut head, |_| None).unwrap(), 0);
        p.push(&[0, 7, 1, 2]).unwrap();
        p.push(&[1, 8, 3, 4]).unwrap();
        // The head alone: the rest is not read.
        let mut seen = [0u64; 2];
        let words = c
            .try_pop_stamped_with(0, &mut head, |h| {
                seen.copy_from_slice(h);
                None
            })
            .unwrap();
        assert_eq!((words, seen, rest), (2, [0, 7], [0, 0, 0]));
        // The rest where asked, as much of it as the slot holds.
        assert_eq!(
            c.try_pop_stamped_with(1, &mut head, |_| Some(&mut rest[..]))
                .unwrap(),
            4
        );
        assert_eq!((head, rest), ([1, 8], [3, 4, 0]));
        // A place shorter than the rest gets what fits.
        p.push(&[2, 9, 5, 6]).unwrap();
        assert_eq!(
            c.try_pop_stamped_with(2, &mut head, |_| Some(&mut rest[..1]))
                .unwrap(),
            3
        );
        assert_eq!(rest, [5, 4, 0]);
        // A head longer than the frame is the frame.
        p.push(&[3, 10, 11, 12]).unwrap();
        let mut long = [0u64; 9];
        assert_eq!(
            c.try_pop_stamped_with(3, &mut long, |_| Some(&mut rest[..]))
                .unwrap(),
            4
        );
        assert_eq!(long[..4], [3, 10, 11, 12]);
        assert_eq!(c.try_pop_stamped_with(4, &mut head, |_| None).unwrap(), 0);
    }

    #[test]
    fn corrupt_head_is_refused() {
        let m = mem(2, 1);
        let mut p = Producer::new(m.view());
        p.push(&[1]).unwrap();
        p.push(&[2]).unwrap();
        m.head_word().store(7, Ordering::Relaxed);
        assert!(matches!(p.push(&[3]), Err(PushError::Corrupt(_))));
        assert!(p.free_slots().is_err());
    }

    #[test]
    fn view_checks_its_geometry() {
        let m = mem(4, 2);
        let slots: Vec<AtomicU64> = (0..8).map(|_| AtomicU64::new(0)).collect();
        let (t, h) = (m.tail_word(), m.head_word());
        assert!(RingView::new(t, h, &slots, 3, 2).is_none());
        assert!(RingView::new(t, h, &slots, 4, 3).is_none());
        assert!(RingView::new(t, h, &slots, 4, 0).is_none());
        assert!(RingView::new(t, h, &slots, 4, 2).is_some());
    }
}
