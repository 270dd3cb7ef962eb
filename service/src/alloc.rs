//! The C allocator's arenas: the one module of this crate allowed `unsafe`.
//!
//! The `vsnap` binary allocates through jemalloc, but SQLite (bundled C)
//! still calls glibc's malloc, on whichever blocking thread runs the
//! query. glibc gives a thread that meets contention an arena of its own,
//! up to eight per core, each keeping what is freed for its own reuse.
//! When all of the service's memory went through glibc, a dozen such
//! arenas made its resident size grow by 22 % in 10 minutes under 50 API
//! clients while heaptrack put the live heap flat at about 3.2 MiB; with
//! two arenas, 8.5 % (docs/benchmarks.md). The cap stays for what C code
//! still allocates there.
#![allow(unsafe_code)]

/// The cap the service sets: one arena beside the main one, for threads
/// that meet contention. The service's allocations are small (JSON,
/// SQLite rows), so little time is lost waiting for an arena's lock.
pub const SERVICE_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at `max`, unless the operator chose a cap
/// (`MALLOC_ARENA_MAX`, or `glibc.malloc.arena_max` in `GLIBC_TUNABLES`).
/// Call it before threads start: an arena, once made, stays. Returns
/// whether this call set the cap: false where the operator's choice
/// stands, glibc refused, or the C library is not glibc.
pub fn limit_arenas(max: i32) -> bool {
    let chosen = std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
    if chosen {
        return false;
    }
    set_arena_max(max)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_arena_max(max: i32) -> bool {
    // SAFETY: mallopt takes two integers by value and only changes
    // malloc's own parameters, which glibc guards with its own lock; no
    // memory of ours is touched. It returns 1 on success.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, max) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_max: i32) -> bool {
    false
}
