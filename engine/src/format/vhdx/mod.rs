//! VHDX, Hyper-V's format since Windows Server 2012 ([MS-VHDX]).
//!
//! [`parse`] holds the pure parsers of the on-disk structures (the file
//! identifier, the two headers and the choice between them, the region
//! table, the metadata items, BAT entries and their interleaving with
//! sector bitmaps), every CRC-32C checked. They take bytes and return
//! values or the specific error, so they are fuzzed and tested without
//! files; opening an image through [`super::DiskImage`] builds on them.

pub mod parse;
