//! The trainer's data RNG, whose state is what a checkpoint saves to
//! continue a run's data order exactly.

use aha_tensor::rng::SplitMix64;

/// The data generator of the toy tasks and the trainer's draws (SFT
/// batches, pretraining problems): splitmix64 with a seed of its own.
#[derive(Debug, Clone)]
pub struct Rng(SplitMix64);

impl Rng {
    /// Seeded stream.
    pub fn new(seed: u64) -> Rng {
        Rng(SplitMix64(seed ^ 0x51_7cc1_b727_220a))
    }
    /// The generator's state, for checkpoints.
    pub fn state(&self) -> u64 {
        self.0 .0
    }
    /// A generator continuing from a saved [`Rng::state`].
    pub fn from_state(state: u64) -> Rng {
        Rng(SplitMix64(state))
    }
    /// Next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0.below(n)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        self.0.unit()
    }
}
