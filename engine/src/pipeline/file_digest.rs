//! A copy's file digest (its `B3SUMS` line), hashed by the workers as they
//! write each chunk, while its bytes are still in their cache, and put
//! together in file order.
//!
//! Each worker hashes its chunk's bytes at the offsets they take in the
//! target file ([`Span`]s); the fold adds the bytes vsnap itself puts
//! around them (headers, tables, a VHD's sector bitmaps and footer) and
//! folds everything with [`FileTree`]. So the copy hashes each byte at its
//! file offset once, in parallel, with no second read and no thread that
//! walks the whole file alone.

use crate::digest::{FileTree, Span};
use crate::error::Result;
use vsnap_formats::layered::PlacedFile;

/// A block-structured target's file: the bytes before the first block,
/// then each placed block (after its own per-block header, a VHD's sector
/// bitmap), then a trailer.
#[derive(Debug)]
pub(super) struct Shape<'a> {
    pub prefix: &'a [u8],
    /// The placed blocks, in file order (which is virtual order).
    pub placed: &'a [u64],
    pub per_block: Vec<u8>,
    pub suffix: &'a [u8],
    /// Where each placed block's data sits.
    pub file: PlacedFile<'a>,
}

/// How a target's file relates to the disk it holds.
#[derive(Debug)]
pub(super) enum Layout<'a> {
    /// A raw copy: the file is the disk, so its digest is the disk's.
    Raw,
    /// A fixed VHD: the disk's bytes, then this footer.
    Fixed(&'a [u8; 512]),
    Blocks(Shape<'a>),
}

/// One piece of a target file: a block header the layout knows, or bytes
/// a worker hashed.
#[derive(Debug)]
enum Part {
    Header,
    Span(Span),
}

/// What a worker hashed of one chunk for the file digest of the copy it
/// goes to: its pieces, in file order.
#[derive(Debug, Default)]
pub struct FileParts(Vec<Part>);

impl Layout<'_> {
    /// Hashes the pieces of the file that hold the disk's bytes
    /// `start..start + len` (`data`, or zeros where the chunk was never
    /// read), adding them to `parts` in file order. Runs on the worker
    /// that read the bytes, slice by slice while they are in its cache;
    /// any cut gives the same digest.
    pub(super) fn hash(&self, start: u64, len: u64, data: Option<&[u8]>, parts: &mut FileParts) {
        let end = start + len;
        let span = |file_at: u64, from: u64, to: u64| match data {
            Some(d) => Span::hash(file_at, &d[(from - start) as usize..(to - start) as usize]),
            None => Span::zeros(file_at, to - from),
        };
        let parts = &mut parts.0;
        match self {
            Layout::Raw => {}
            Layout::Fixed(_) => parts.push(Part::Span(span(start, start, end))),
            Layout::Blocks(shape) => {
                let bs = shape.file.block_size;
                let first = shape.placed.partition_point(|&b| (b + 1) * bs <= start);
                for &b in shape.placed[first..].iter().take_while(|&&b| b * bs < end) {
                    let Some(Some(block_at)) = shape.file.blocks.get(b as usize) else {
                        continue;
                    };
                    let (b_start, b_end) = (b * bs, (b + 1) * bs);
                    if b_start >= start {
                        parts.push(Part::Header);
                    }
                    let (from, to) = (b_start.max(start), b_end.min(end));
                    let file_at = block_at + shape.file.data_skip + (from - b_start);
                    parts.push(Part::Span(span(file_at, from, to)));
                }
            }
        }
    }

    /// The tree a target's parts are folded into, primed with the
    /// bytes before the first chunk's; `None` for a raw copy.
    pub(super) fn start(&self) -> Option<FileTree> {
        let mut tree = FileTree::new();
        match self {
            Layout::Raw => return None,
            Layout::Fixed(_) => {}
            Layout::Blocks(shape) => tree.push_bytes(shape.prefix),
        }
        Some(tree)
    }

    /// Adds one chunk's parts, chunks in disk order.
    pub(super) fn add(&self, tree: &mut FileTree, parts: &FileParts) -> Result<()> {
        for part in &parts.0 {
            match (part, self) {
                (Part::Span(span), _) => tree.push_span(span)?,
                (Part::Header, Layout::Blocks(shape)) => tree.push_bytes(&shape.per_block),
                (Part::Header, _) => {}
            }
        }
        Ok(())
    }

    /// The file's digest, once every chunk of a disk of `size` bytes is in.
    pub(super) fn finish(&self, mut tree: FileTree, size: u64) -> Result<blake3::Hash> {
        match self {
            Layout::Raw => {}
            Layout::Fixed(footer) => tree.push_bytes(&footer[..]),
            Layout::Blocks(shape) => {
                // The last block's data area runs past the end of the disk.
                if let Some(&last) = shape.placed.last() {
                    let end = (last + 1) * shape.file.block_size;
                    let pad = end.saturating_sub(size);
                    if pad > 0 {
                        tree.push_span(&Span::zeros(tree.position(), pad))?;
                    }
                }
                tree.push_bytes(shape.suffix);
            }
        }
        tree.finish()
    }
}
