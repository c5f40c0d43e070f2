//! Pieces shared by the trainer's test binaries.

/// A reward that differs within every group: the completion's length mod 3
/// (so a GRPO step always has advantages to learn from).
pub struct LengthMod3;

impl aha_rewards::Reward for LengthMod3 {
    fn name(&self) -> &str {
        "length_mod_3"
    }
    fn score(&self, _: &aha_rewards::Example, completion: &str) -> aha_rewards::Outcome {
        aha_rewards::Outcome::new((completion.len() % 3) as f64, aha_rewards::Status::Correct)
    }
}
