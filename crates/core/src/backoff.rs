//! Retry pacing shared by every client that talks to an external service (BigQuery, SQS, ...).

use std::time::Duration;

/// Exponential backoff with jitter, bounded in attempts: 100 ms doubling to 10 s, 10 attempts (about a minute).
#[derive(Debug, Clone)]
pub struct Backoff {
    attempt: u32,
    max_attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { attempt: 0, max_attempts: 10 }
    }
}

impl Backoff {
    /// The wait before the next attempt, or `None` once attempts are used up.
    pub fn next_delay(&mut self) -> Option<Duration> {
        if self.attempt >= self.max_attempts {
            return None;
        }
        let base = 100u64.saturating_mul(1 << self.attempt.min(7)).min(10_000);
        self.attempt += 1;
        // Up to 50% jitter so that subtasks do not retry in lockstep.
        let jitter = fastrand::u64(0..=base / 2);
        Some(Duration::from_millis(base / 2 + jitter))
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}
