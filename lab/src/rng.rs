//! The lab's deterministic generator for workloads and the tests' random
//! rounds: `rand`'s small generator, seeded, so the same seed gives the
//! same sequence and a failing round is replayed from the seed it
//! printed. Not for secrets.

use rand::rngs::SmallRng;
use rand::{Rng as _, SeedableRng};

#[derive(Debug, Clone)]
pub struct Rng(SmallRng);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(SmallRng::seed_from_u64(seed))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill_bytes(buf);
    }
}
