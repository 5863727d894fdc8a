//! A budget for log lines that anyone on the internet can cause.
//!
//! Refusals before authentication (garbage on the agent port, a wrong token, a flood of
//! unknown methods) are logged so that an operator can see them, but a hostile client must not
//! be able to turn the log into its megaphone. Each budget allows a fixed number of lines per
//! second; the next line allowed after a full second says how many were suppressed.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines per second allowed for everything logged before a connection authenticates.
pub const PRE_AUTH_LINES_PER_SECOND: u32 = 20;

/// The process-wide budget for pre-authentication log lines.
pub static PRE_AUTH_LOG: LogBudget = LogBudget::new(PRE_AUTH_LINES_PER_SECOND);

pub struct LogBudget {
    per_second: u32,
    state: Mutex<Window>,
}

struct Window {
    started: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl LogBudget {
    pub const fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: Mutex::new(Window {
                started: None,
                used: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were suppressed since the
    /// last line written; `None` when the line is to be dropped (and counted).
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = w
            .started
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(1));
        if fresh {
            w.started = Some(now);
            w.used = 0;
        }
        if w.used < self.per_second {
            w.used += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_budget_then_reports_what_it_dropped() {
        let b = LogBudget::new(3);
        let t0 = Instant::now();
        let got: Vec<_> = (0..10).map(|_| b.allow_at(t0)).collect();
        assert_eq!(&got[..3], &[Some(0), Some(0), Some(0)]);
        assert!(got[3..].iter().all(Option::is_none));
        assert_eq!(b.allow_at(t0 + Duration::from_millis(999)), None);
        assert_eq!(b.allow_at(t0 + Duration::from_secs(1)), Some(8));
        assert_eq!(b.allow_at(t0 + Duration::from_secs(1)), Some(0));
    }
}
