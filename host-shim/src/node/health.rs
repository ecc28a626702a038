//! What the node daemon's `/healthz` answers: healthy once the node has a
//! table and while its Kubernetes watch works, unhealthy when the watch
//! has kept failing past a bound (as kube-proxy's healthz turns unhealthy
//! when its rules go stale). Agents keep their tables either way; this
//! says the daemon no longer follows the cluster.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// A watch that failed and then went quiet (neither failing again nor
/// delivering an event) may have recovered: a watch started again from
/// the last resource version delivers nothing until something changes.
/// kube-rs's watcher retries a failed watch at most 30 s apart (plus a
/// jitter under 1 s and the failing request's own time), so this long
/// without a failure ends a failing streak.
const QUIET: Duration = Duration::from_secs(120);

/// Failures of the watch since its last event.
#[derive(Default)]
pub struct WatchHealth {
    failing: Mutex<Option<Streak>>,
}

#[derive(Clone, Copy)]
struct Streak {
    since: Instant,
    last: Instant,
}

impl WatchHealth {
    /// An event arrived: the watch works.
    pub fn event(&self) {
        *self.failing.lock().unwrap() = None;
    }

    /// The watch failed at `now` (the watcher retries by itself).
    pub fn failed(&self, now: Instant) {
        let mut failing = self.failing.lock().unwrap();
        let since = match *failing {
            Some(streak) if now.duration_since(streak.last) < QUIET => streak.since,
            _ => now,
        };
        *failing = Some(Streak { since, last: now });
    }

    /// How long the watch has been failing at `now`, if it is.
    pub fn failing_for(&self, now: Instant) -> Option<Duration> {
        let streak = (*self.failing.lock().unwrap())?;
        (now.duration_since(streak.last) < QUIET).then(|| now.duration_since(streak.since))
    }
}

/// Why the daemon is unhealthy, if it is: no table yet (version 0), or a
/// watch failing for longer than `bound`.
pub fn problem(version: u64, watch_failing: Option<Duration>, bound: Duration) -> Option<String> {
    if version == 0 {
        return Some(
            "no table yet: the Kubernetes watch has not listed Services and EndpointSlices".into(),
        );
    }
    let failing = watch_failing.filter(|failing| *failing > bound)?;
    Some(format!(
        "the Kubernetes watch has been failing for {}s (bound {}s): the table may be stale",
        failing.as_secs(),
        bound.as_secs()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_fails_until_an_event_or_a_long_quiet() {
        let s = Duration::from_secs;
        let watch = WatchHealth::default();
        let t0 = Instant::now();
        assert_eq!(watch.failing_for(t0), None);
        watch.failed(t0);
        watch.failed(t0 + s(30));
        assert_eq!(watch.failing_for(t0 + s(40)), Some(s(40)));
        watch.event();
        assert_eq!(watch.failing_for(t0 + s(41)), None, "an event ends it");
        watch.failed(t0 + s(50));
        assert_eq!(watch.failing_for(t0 + s(60)), Some(s(10)));
        assert_eq!(watch.failing_for(t0 + s(50) + QUIET), None, "quiet since");
        // A failure after the quiet starts a new streak.
        watch.failed(t0 + s(200));
        assert_eq!(watch.failing_for(t0 + s(201)), Some(s(1)));
    }

    #[test]
    fn unhealthy_without_a_table_or_with_a_watch_failing_past_the_bound() {
        let s = Duration::from_secs;
        let bound = s(60);
        assert!(problem(0, None, bound).unwrap().contains("no table"));
        assert_eq!(problem(3, None, bound), None);
        assert_eq!(problem(3, Some(s(60)), bound), None, "at the bound");
        let stale = problem(3, Some(s(61)), bound).unwrap();
        assert!(stale.contains("failing for 61s"), "{stale}");
    }
}
