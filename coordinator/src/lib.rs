//! The coordinator: vsnap's VSS requestor.
//!
//! It will reach an agent inside every guest, freeze them together, take a
//! host snapshot of every disk and thaw at once (see shared/DESIGN.md). Until
//! the coordinator issue lands this crate deliberately holds no code: the
//! workspace keeps its place so the engine's public API is shaped by two
//! consumers from the start, and no behaviour is claimed that does not exist.
