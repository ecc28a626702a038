//! The one backoff the host side retries with: each failure in a row
//! waits twice as long as the one before, up to a cap, and a success
//! starts again from the first wait. The client's reconnects, the node
//! daemon's questions to Kata's shim and its writes to each sandbox's
//! agent all use it.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    delay: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            delay: initial.min(max),
            failures: 0,
        }
    }

    /// What the next failure will wait.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// One more failure in a row: how long to wait before trying again.
    pub fn failed(&mut self) -> Duration {
        let delay = self.delay;
        self.delay = (delay * 2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure waits the first delay again.
    pub fn reset(&mut self) {
        self.delay = self.initial.min(self.max);
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_starts_over_after_a_success() {
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(500));
        assert_eq!(backoff.delay(), ms(100));
        let waits: Vec<Duration> = (0..5).map(|_| backoff.failed()).collect();
        assert_eq!(waits, [ms(100), ms(200), ms(400), ms(500), ms(500)]);
        assert_eq!(backoff.failures(), 5);
        backoff.reset();
        assert_eq!(backoff.failures(), 0);
        assert_eq!(backoff.failed(), ms(100));
        // A cap below the first wait is the wait.
        assert_eq!(Backoff::new(ms(100), ms(50)).failed(), ms(50));
    }
}
