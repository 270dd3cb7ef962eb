//! Allocation maps: which ranges of a virtual disk hold data, and where.
//!
//! The engine streams only data extents and hashes the rest as zeros without
//! reading it, so a map must cover the disk exactly, in order, with no gaps.
//! [`MapBuilder`] enforces that and merges neighbours, so every format
//! produces the same canonical shape and maps can be compared directly.

use serde::Serialize;

/// What a range of the virtual disk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtentKind {
    /// Stored in an image file, at `file_offset` in layer `layer`.
    Data,
    /// Explicitly recorded as zeros (a VHDX ZERO block); nothing to read.
    Zero,
    /// Not stored in any layer; reads as zeros.
    Unallocated,
}

/// A run of the virtual disk with one kind, one layer and contiguous file
/// offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Extent {
    /// Virtual-disk offset in bytes.
    pub offset: u64,
    pub length: u64,
    pub kind: ExtentKind,
    /// Which layer of a chain holds the data: 0 is the image that was
    /// opened, 1 its parent, and so on. `None` where no layer holds it.
    pub layer: Option<usize>,
    /// Where the data starts in that layer's file.
    pub file_offset: Option<u64>,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    fn joins(&self, next: &Extent) -> bool {
        self.end() == next.offset
            && self.kind == next.kind
            && self.layer == next.layer
            && match (self.file_offset, next.file_offset) {
                (Some(a), Some(b)) => a + self.length == b,
                (None, None) => true,
                _ => false,
            }
    }
}

/// The extents of a whole virtual disk, sorted, contiguous, merged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct AllocationMap {
    extents: Vec<Extent>,
}

impl AllocationMap {
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    pub fn into_extents(self) -> Vec<Extent> {
        self.extents
    }

    /// The virtual size the map covers.
    pub fn size(&self) -> u64 {
        self.extents.last().map_or(0, Extent::end)
    }

    /// Bytes held as data, in any layer.
    pub fn data_bytes(&self) -> u64 {
        self.extents
            .iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .map(|e| e.length)
            .sum()
    }

    /// Lays `self` over `lower`: where `self` is unallocated, `lower`
    /// shows through, with its layers numbered below `self`'s.
    ///
    /// This is how a differencing chain resolves, one layer at a time.
    pub fn overlay(&self, lower: &AllocationMap, lower_layer_base: usize) -> AllocationMap {
        let mut out = MapBuilder::new(0);
        let mut lower_iter = lower.extents.iter().peekable();
        for upper in &self.extents {
            if upper.kind != ExtentKind::Unallocated {
                out.push(*upper);
                continue;
            }
            let (start, end) = (upper.offset, upper.end());
            let mut pos = start;
            while pos < end {
                // Skip lower extents that end before `pos`.
                while lower_iter.next_if(|l| l.end() <= pos).is_some() {}
                let Some(l) = lower_iter.peek() else {
                    // The parent is smaller than the child: zeros.
                    out.push(Extent {
                        offset: pos,
                        length: end - pos,
                        ..*upper
                    });
                    break;
                };
                let piece_end = l.end().min(end);
                let skip = pos.saturating_sub(l.offset);
                out.push(Extent {
                    offset: pos,
                    length: piece_end - pos,
                    kind: l.kind,
                    layer: l.layer.map(|n| n + lower_layer_base),
                    file_offset: l.file_offset.map(|f| f + skip),
                });
                pos = piece_end;
            }
        }
        out.finish()
    }
}

/// Builds an [`AllocationMap`] from extents pushed in order.
#[derive(Debug)]
pub struct MapBuilder {
    extents: Vec<Extent>,
    next: u64,
}

/// The map of a disk of `size` bytes stored as-is at file offset 0 of
/// layer 0 (raw, or a fixed VHD's data area), given the file's data
/// ranges: holes are unallocated, since they read as zeros. `None` (the
/// filesystem cannot tell) maps everything as data.
pub fn map_from_data_ranges(size: u64, ranges: Option<Vec<(u64, u64)>>) -> AllocationMap {
    let mut map = MapBuilder::new(0);
    let Some(ranges) = ranges else {
        map.data(0, size, 0, 0);
        return map.finish();
    };
    let mut pos = 0;
    for (start, end) in ranges {
        let end = end.min(size);
        if end <= start || start < pos {
            continue;
        }
        map.unallocated(pos, start - pos);
        map.data(start, end - start, 0, start);
        pos = end;
    }
    map.unallocated(pos, size - pos);
    map.finish()
}

impl MapBuilder {
    pub fn new(start: u64) -> Self {
        Self {
            extents: Vec::new(),
            next: start,
        }
    }

    /// Appends an extent. Extents must arrive in order and without gaps;
    /// empty ones are dropped.
    pub fn push(&mut self, e: Extent) {
        if e.length == 0 {
            return;
        }
        debug_assert_eq!(e.offset, self.next, "extents pushed out of order");
        self.next = e.end();
        match self.extents.last_mut() {
            Some(last) if last.joins(&e) => last.length += e.length,
            _ => self.extents.push(e),
        }
    }

    pub fn data(&mut self, offset: u64, length: u64, layer: usize, file_offset: u64) {
        self.push(Extent {
            offset,
            length,
            kind: ExtentKind::Data,
            layer: Some(layer),
            file_offset: Some(file_offset),
        });
    }

    pub fn unallocated(&mut self, offset: u64, length: u64) {
        self.push(Extent {
            offset,
            length,
            kind: ExtentKind::Unallocated,
            layer: None,
            file_offset: None,
        });
    }

    pub fn finish(self) -> AllocationMap {
        AllocationMap {
            extents: self.extents,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_merges_contiguous_data_but_not_across_file_gaps() {
        let mut b = MapBuilder::new(0);
        b.data(0, 512, 0, 4096);
        b.data(512, 512, 0, 4608);
        b.data(1024, 512, 0, 9000);
        b.unallocated(1536, 512);
        b.unallocated(2048, 512);
        let m = b.finish();
        assert_eq!(m.extents().len(), 3);
        assert_eq!(m.extents()[0].length, 1024);
        assert_eq!(m.extents()[2].length, 1024);
        assert_eq!(m.size(), 2560);
        assert_eq!(m.data_bytes(), 1536);
    }

    #[test]
    fn overlay_shows_the_parent_through_holes_and_renumbers_layers() {
        let mut top = MapBuilder::new(0);
        top.unallocated(0, 1000);
        top.data(1000, 100, 0, 7);
        top.unallocated(1100, 900);
        let mut parent = MapBuilder::new(0);
        parent.data(0, 1500, 0, 100);
        parent.unallocated(1500, 500);
        let m = top.finish().overlay(&parent.finish(), 1);
        let e = m.extents();
        assert_eq!(e.len(), 4);
        assert_eq!((e[0].offset, e[0].length, e[0].layer), (0, 1000, Some(1)));
        assert_eq!((e[1].layer, e[1].file_offset), (Some(0), Some(7)));
        // The parent's extent resumes at the right file offset.
        assert_eq!((e[2].offset, e[2].file_offset), (1100, Some(1200)));
        assert_eq!((e[3].kind, e[3].length), (ExtentKind::Unallocated, 500));
    }
}
