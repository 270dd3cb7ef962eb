//! Coalesced reads from packs: a chunk is read with its neighbours, one
//! ranged GET per window of a pack, so a restore or verify that reads a
//! pack's chunks in order makes one request for several chunks, not one
//! each. (A request to object storage costs far more than its bytes:
//! s3s-fs on loopback spends some 16 ms on any GET, and AWS S3 bills and
//! rate-limits by request.)
//!
//! A window is the blobs whose starts fall in one [`WINDOW`]-aligned
//! stretch of a pack, fetched whole by the first reader that needs one of
//! them; readers of its other blobs wait for that fetch rather than make
//! their own. A reader that says which chunks it will read, in order
//! ([`ReadAhead::plan`]), has the next [`AHEAD`] windows of its plan
//! fetched in the background while it works through the current one, so
//! several GETs are in flight, not one. Windows are kept up to a byte
//! budget, oldest dropped first. Nothing here is trusted: every blob cut
//! from a window is checked against its pack entry, and a window that
//! cannot be fetched or a blob that fails its check is read again on its
//! own.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

/// A window's span in a pack.
pub(super) const WINDOW: u64 = 16 << 20;
/// Windows kept at most, in bytes: eight windows.
const BUDGET: u64 = 8 * WINDOW;
/// Windows of a plan fetched ahead of the one being read: with the one
/// read, half the budget, so what is fetched ahead is not dropped before
/// it is read.
const AHEAD: usize = 3;
/// A plan longer than this (10 TiB of 16 MiB windows) starts over: it is
/// only a hint, and a long-running service must not grow it forever.
const PLAN_LIMIT: usize = 1 << 20;

/// Buffers kept for windows to come: as many as are fetched ahead, and
/// the one read.
const SPARE: usize = AHEAD + 1;

/// The bytes of one window: from `start` in the pack. A pooled window
/// gives its buffer back when it goes.
#[derive(Debug)]
pub(super) struct Window {
    pub start: u64,
    pub bytes: Vec<u8>,
    home: Option<Arc<Buffers>>,
}

impl Window {
    #[cfg(test)]
    fn new(start: u64, bytes: Vec<u8>) -> Self {
        Window {
            start,
            bytes,
            home: None,
        }
    }

    pub(super) fn pooled(start: u64, bytes: Vec<u8>, home: Arc<Buffers>) -> Self {
        Window {
            start,
            bytes,
            home: Some(home),
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if let Some(home) = &self.home {
            home.give(std::mem::take(&mut self.bytes));
        }
    }
}

/// Window buffers given back by windows gone, for the next fetches: the
/// allocator hands a buffer of a window's size back to the kernel when it
/// is freed, so a fresh one for every window was faulted in page by page
/// (4 % of a restore's CPU samples, more with the page clearing).
#[derive(Debug, Default)]
pub(super) struct Buffers(Mutex<Vec<Vec<u8>>>);

impl Buffers {
    /// A spare buffer, empty, or a new one.
    pub(super) fn take(&self) -> Vec<u8> {
        let mut b = self
            .0
            .lock()
            .ok()
            .and_then(|mut spare| spare.pop())
            .unwrap_or_default();
        b.clear();
        b
    }

    fn give(&self, buf: Vec<u8>) {
        if let Ok(mut spare) = self.0.lock() {
            if spare.len() < SPARE && buf.capacity() > 0 {
                spare.push(buf);
            }
        }
    }
}

/// (pack number, window number in the pack).
type Key = (u32, u64);
type Slot = Arc<OnceLock<Option<Window>>>;

#[derive(Debug, Default)]
struct Slots {
    map: HashMap<Key, Slot>,
    order: VecDeque<Key>,
    bytes: u64,
}

/// A window a reader said it will need: where it is in the bucket.
#[derive(Debug, Clone)]
pub(super) struct Planned {
    pub window: Key,
    pub object: String,
    pub range: Range<u64>,
}

#[derive(Debug, Default)]
struct Plan {
    list: Vec<Planned>,
    at: HashMap<Key, usize>,
}

#[derive(Debug, Default)]
pub(super) struct ReadAhead {
    slots: Mutex<Slots>,
    plan: Mutex<Plan>,
    buffers: Arc<Buffers>,
}

/// The window key of the blob at `offset` of pack number `pack`.
pub(super) fn key(pack: u32, offset: u64) -> Key {
    (pack, offset / WINDOW)
}

impl ReadAhead {
    /// Adds windows a reader will need, in the order it will need them;
    /// windows planned already keep their place.
    pub(super) fn plan(&self, windows: impl IntoIterator<Item = Planned>) {
        let Ok(mut plan) = self.plan.lock() else {
            return;
        };
        if plan.list.len() > PLAN_LIMIT {
            *plan = Plan::default();
        }
        for w in windows {
            if plan.at.contains_key(&w.window) {
                continue;
            }
            let n = plan.list.len();
            plan.at.insert(w.window, n);
            plan.list.push(w);
        }
    }

    /// The spare window buffers, for the fetches of this read-ahead.
    pub(super) fn buffers(&self) -> Arc<Buffers> {
        Arc::clone(&self.buffers)
    }

    /// Runs `use_blob` on the blob `offset..offset + length` of pack
    /// number `pack`, in its window, which `fetch` reads when no reader
    /// has yet. `None` when the window could not be read or does not hold
    /// the blob. The plan's next windows are fetched meanwhile, by
    /// `ahead`.
    pub(super) fn blob<A, R>(
        self: &Arc<Self>,
        pack: u32,
        offset: u64,
        length: u32,
        fetch: impl FnOnce() -> Option<Window>,
        ahead: &A,
        use_blob: impl FnOnce(&[u8]) -> R,
    ) -> Option<R>
    where
        A: Fn(&Planned) -> Option<Window> + Clone + Send + 'static,
    {
        let key = key(pack, offset);
        let slot = self.slot(key, false)?;
        self.fetch_ahead(key, ahead);
        let window = slot.get_or_init(|| self.fetched(key, &slot, fetch()));
        let bytes = window.as_ref().and_then(|w| {
            let from = usize::try_from(offset.checked_sub(w.start)?).ok()?;
            let to = from.checked_add(length as usize)?;
            w.bytes.get(from..to)
        })?;
        Some(use_blob(bytes))
    }

    /// The window's slot, made where there is none; with `only_new`,
    /// `None` where there is one already.
    fn slot(&self, key: Key, only_new: bool) -> Option<Slot> {
        let mut s = self.slots.lock().ok()?;
        if let Some(slot) = s.map.get(&key) {
            return (!only_new).then(|| Arc::clone(slot));
        }
        let slot = Slot::default();
        s.map.insert(key, Arc::clone(&slot));
        s.order.push_back(key);
        Some(slot)
    }

    /// Starts fetching the windows the plan puts after `key` that are
    /// neither kept nor on their way, each from a thread of its own.
    fn fetch_ahead<A>(self: &Arc<Self>, key: Key, ahead: &A)
    where
        A: Fn(&Planned) -> Option<Window> + Clone + Send + 'static,
    {
        let next: Vec<Planned> = match self.plan.lock() {
            Ok(plan) => match plan.at.get(&key) {
                Some(&at) => plan.list.iter().skip(at + 1).take(AHEAD).cloned().collect(),
                None => return,
            },
            Err(_) => return,
        };
        for w in next {
            let Some(slot) = self.slot(w.window, true) else {
                continue;
            };
            let (me, ahead) = (Arc::clone(self), ahead.clone());
            std::thread::spawn(move || {
                slot.get_or_init(|| me.fetched(w.window, &slot, ahead(&w)));
            });
        }
    }

    /// Counts a window just fetched against the budget, dropping the
    /// oldest others while it is over.
    fn fetched(&self, key: Key, slot: &Slot, w: Option<Window>) -> Option<Window> {
        if let (Some(w), Ok(mut s)) = (&w, self.slots.lock()) {
            // A window evicted while it was being fetched is no longer in
            // the map; its bytes go when its readers are done, so only a
            // window still kept counts against the budget.
            if s.map.get(&key).is_some_and(|kept| Arc::ptr_eq(kept, slot)) {
                s.bytes += w.bytes.len() as u64;
                while s.bytes > BUDGET && s.order.len() > 1 {
                    let Some(old) = s.order.pop_front() else {
                        break;
                    };
                    if old == key {
                        s.order.push_back(old);
                        continue;
                    }
                    if let Some(gone) = s.map.remove(&old) {
                        let size = gone
                            .get()
                            .and_then(Option::as_ref)
                            .map_or(0, |w| w.bytes.len());
                        s.bytes = s.bytes.saturating_sub(size as u64);
                    }
                }
            }
        }
        w
    }
}

/// The range of the window of a pack holding the blob at `offset`: from
/// the first blob that starts in its stretch to the end of the last, given
/// the pack's blobs as (offset, length), sorted.
pub(super) fn window_range(blobs: &[(u64, u32)], offset: u64) -> Option<Range<u64>> {
    let lo = offset / WINDOW * WINDOW;
    let hi = lo + WINDOW;
    let first = blobs.partition_point(|&(o, _)| o < lo);
    let last = blobs.partition_point(|&(o, _)| o < hi);
    let (start, _) = *blobs.get(first)?;
    let &(o, l) = blobs.get(last.checked_sub(1)?)?;
    (last > first).then(|| start..o + u64::from(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_hold_the_blobs_that_start_in_them() {
        let m = 1 << 20;
        let blobs = [
            (0, m as u32),
            (m, m as u32),
            (15 * m, 2 * m as u32),
            (17 * m, 100),
        ];
        assert_eq!(window_range(&blobs, 0), Some(0..17 * m));
        assert_eq!(window_range(&blobs, 15 * m), Some(0..17 * m));
        assert_eq!(window_range(&blobs, 17 * m), Some(17 * m..17 * m + 100));
        assert_eq!(window_range(&blobs, 40 * m), None);
        assert_eq!(window_range(&[], 0), None);
    }

    /// What a window of `n` bytes from `start` fetched ahead holds.
    fn made(w: &Planned) -> Option<Window> {
        let len = (w.range.end - w.range.start) as usize;
        Some(Window::new(
            w.range.start,
            (0..len).map(|i| i as u8).collect(),
        ))
    }

    #[test]
    fn one_fetch_serves_a_window_and_a_bad_one_serves_nothing() {
        let ra = Arc::new(ReadAhead::default());
        let mut fetches = 0;
        let mut fetch = || {
            fetches += 1;
            Some(Window::new(10, (0..100u8).collect()))
        };
        let none = |_: &Planned| None;
        assert_eq!(
            ra.blob(0, 10, 3, &mut fetch, &none, <[u8]>::to_vec),
            Some([0, 1, 2].to_vec())
        );
        assert_eq!(
            ra.blob(0, 50, 2, || None, &none, <[u8]>::to_vec),
            Some([40, 41].to_vec())
        );
        // Past the window's bytes: nothing, never a panic.
        assert!(ra
            .blob(0, 105, 10, || None, &none, <[u8]>::to_vec)
            .is_none());
        assert!(ra.blob(0, 5, 1, || None, &none, <[u8]>::to_vec).is_none());
        assert_eq!(fetches, 1);
        assert!(ra.blob(1, 0, 1, || None, &none, <[u8]>::to_vec).is_none());
    }

    #[test]
    fn a_pooled_window_gives_its_buffer_back_and_spares_are_bounded() {
        let home = Arc::new(Buffers::default());
        let mut buf = home.take();
        buf.extend_from_slice(&[7; 4096]);
        let at = buf.as_ptr();
        drop(Window::pooled(0, buf, Arc::clone(&home)));
        // The same allocation comes back, empty.
        let again = home.take();
        assert_eq!((again.as_ptr(), again.len()), (at, 0));
        assert!(again.capacity() >= 4096);
        for _ in 0..SPARE + 3 {
            drop(Window::pooled(0, vec![1; 16], Arc::clone(&home)));
        }
        assert_eq!(home.0.lock().unwrap().len(), SPARE);
    }

    #[test]
    fn the_next_windows_of_a_plan_are_fetched_ahead_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let ra = Arc::new(ReadAhead::default());
        let planned = |pack: u32, n: u64| Planned {
            window: (pack, n),
            object: format!("p{pack}"),
            range: n * WINDOW..n * WINDOW + 64,
        };
        let plan = [
            planned(0, 0),
            planned(0, 1),
            planned(3, 0),
            planned(1, 2),
            planned(2, 0),
        ];
        ra.plan(plan.iter().cloned());
        // Planned twice: the first place holds.
        ra.plan([planned(0, 1)]);
        let count = Arc::new(AtomicUsize::new(0));
        let ahead = {
            let count = Arc::clone(&count);
            move |w: &Planned| {
                count.fetch_add(1, Ordering::SeqCst);
                made(w)
            }
        };
        assert_eq!(
            ra.blob(0, 4, 2, || made(&plan[0]), &ahead, <[u8]>::to_vec),
            Some([4, 5].to_vec())
        );
        // The three after the first are fetched in the background, and a
        // reader of one uses that fetch instead of making its own.
        let waited = std::time::Instant::now();
        while count.load(Ordering::SeqCst) < 3 {
            assert!(waited.elapsed().as_secs() < 10, "nothing fetched ahead");
            std::thread::yield_now();
        }
        assert_eq!(
            ra.blob(3, 8, 2, || panic!("fetched twice"), &ahead, <[u8]>::to_vec),
            Some([8, 9].to_vec())
        );
        let second = WINDOW + 1;
        assert_eq!(
            ra.blob(
                0,
                second,
                1,
                || panic!("fetched twice"),
                &ahead,
                <[u8]>::to_vec
            ),
            Some([1].to_vec())
        );
        // Reading the second planned window started the fetch of the
        // fifth; its reader has it from there, or fetches it itself.
        assert_eq!(
            ra.blob(2, 0, 1, || made(&plan[4]), &ahead, <[u8]>::to_vec),
            Some([0].to_vec())
        );
        assert!(count.load(Ordering::SeqCst) <= 4);
        // Unplanned windows fetch nothing ahead.
        let before = count.load(Ordering::SeqCst);
        assert!(ra.blob(9, 0, 1, || None, &ahead, <[u8]>::to_vec).is_none());
        assert_eq!(count.load(Ordering::SeqCst), before);
    }
}
