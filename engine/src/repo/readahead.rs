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
//! their own. Windows are kept up to a byte budget, oldest dropped first.
//! Nothing here is trusted: every blob cut from a window is checked
//! against its pack entry, and a window that cannot be fetched or a blob
//! that fails its check is read again on its own.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

/// A window's span in a pack.
pub(super) const WINDOW: u64 = 16 << 20;
/// Windows kept at most, in bytes: eight windows.
const BUDGET: u64 = 8 * WINDOW;

/// The bytes of one window: from `start` in the pack.
#[derive(Debug)]
pub(super) struct Window {
    pub start: u64,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct Slots {
    map: HashMap<(u32, u64), Arc<OnceLock<Option<Window>>>>,
    order: VecDeque<(u32, u64)>,
    bytes: u64,
}

#[derive(Debug, Default)]
pub(super) struct ReadAhead {
    slots: Mutex<Slots>,
}

impl ReadAhead {
    /// The blob `offset..offset + length` of pack number `pack`, from its
    /// window, which `fetch` reads when no reader has yet. `None` when the
    /// window could not be read or does not hold the blob.
    pub(super) fn blob(
        &self,
        pack: u32,
        offset: u64,
        length: u32,
        fetch: impl FnOnce() -> Option<Window>,
    ) -> Option<Vec<u8>> {
        let key = (pack, offset / WINDOW);
        let slot = {
            let mut s = self.slots.lock().ok()?;
            let slot = s.map.entry(key).or_default().clone();
            if !s.order.contains(&key) {
                s.order.push_back(key);
            }
            slot
        };
        let window = slot.get_or_init(|| {
            let w = fetch();
            if let (Some(w), Ok(mut s)) = (&w, self.slots.lock()) {
                // A window evicted while it was being fetched is no longer
                // in the map; its bytes go when its readers are done, so
                // only a window still kept counts against the budget.
                if s.map.get(&key).is_some_and(|kept| Arc::ptr_eq(kept, &slot)) {
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
        });
        let w = window.as_ref()?;
        let from = usize::try_from(offset.checked_sub(w.start)?).ok()?;
        let to = from.checked_add(length as usize)?;
        w.bytes.get(from..to).map(<[u8]>::to_vec)
    }
}

/// The range of the window of a pack holding the blob at `offset`: from
/// the first blob that starts in its stretch to the end of the last, given
/// the pack's blobs as (offset, length), sorted.
pub(super) fn window_range(blobs: &[(u64, u32)], offset: u64) -> Option<std::ops::Range<u64>> {
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

    #[test]
    fn one_fetch_serves_a_window_and_a_bad_one_serves_nothing() {
        let ra = ReadAhead::default();
        let mut fetches = 0;
        let mut fetch = || {
            fetches += 1;
            Some(Window {
                start: 10,
                bytes: (0..100u8).collect(),
            })
        };
        assert_eq!(ra.blob(0, 10, 3, &mut fetch), Some(vec![0, 1, 2]));
        assert_eq!(ra.blob(0, 50, 2, || None), Some(vec![40, 41]));
        // Past the window's bytes: nothing, never a panic.
        assert_eq!(ra.blob(0, 105, 10, || None), None);
        assert_eq!(ra.blob(0, 5, 1, || None), None);
        assert_eq!(fetches, 1);
        assert_eq!(ra.blob(1, 0, 1, || None), None);
    }
}
