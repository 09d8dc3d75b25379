//! The controller's clock: [`now`] is its only clock read.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use gridweaver_core::time::Timestamp;
use tokio::time::Instant;

/// The controller's clock: wall time that never goes backwards.
///
/// It follows the wall clock forwards (so a gateway whose clock is set by NTP after boot
/// stamps its events with the real time from then on) and ignores a step backwards: from
/// such a step on, time runs on the monotonic clock from the last reading. ACK deadlines
/// are therefore never stretched by a clock step (their timers run on tokio's monotonic
/// clock, and the time they are compared with never goes back), and dispatch ids, which
/// contain the time, never repeat. The monotonic part is tokio's clock, so tests can run the
/// controller on paused, virtual time.
pub fn now() -> Timestamp {
    // One small lock per reading; nothing else is ever done under it.
    // tokio's Instant: the monotonic clock, which a test may pause and advance.
    static ANCHOR: Mutex<Option<(i64, Instant)>> = Mutex::new(None);
    let wall =
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut anchor = ANCHOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let (at, mono) = anchor.get_or_insert((wall, Instant::now()));
    let running = at.saturating_add(i64::try_from(mono.elapsed().as_millis()).unwrap_or(i64::MAX));
    if wall > running {
        *anchor = Some((wall, Instant::now()));
        return Timestamp::from_millis(wall);
    }
    Timestamp::from_millis(running)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_never_goes_backwards() {
        let mut last = now();
        for _ in 0..1000 {
            let t = now();
            assert!(t >= last);
            last = t;
        }
    }
}
