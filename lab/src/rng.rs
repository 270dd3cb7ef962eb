//! A small deterministic generator (xorshift64) for the lab's workloads
//! and the tests' random rounds: the same seed gives the same sequence, so
//! a failing round is replayed from the seed it printed. Not for secrets.

#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Any seed; zero, which xorshift never leaves, is made one.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}
