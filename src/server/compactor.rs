//! etcd's auto-compactor (`--auto-compaction-mode`, `-retention`): runs on
//! the raft core's executor, and only the leader compacts, through the log
//! as a client's `Compact` would.
//!
//! - Periodic: the revision is sampled every tenth of the period (at most
//!   every 6 minutes); once a period has passed, and then every period (at
//!   most every hour), the log is compacted at the oldest sample kept, the
//!   revision of about one period ago.
//! - Revision: every 5 minutes, compacted at the current revision less
//!   the retention, unless that is where the last one was.
//!
//! Each decision is a pure step (`Periodic::step`, `revision_target`), so
//! the schedule is tested with made-up times.

use super::Core;
use crate::config::AutoCompaction;
use crate::proto::etcdserverpb::CompactionRequest;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How often revision mode looks (etcd's `revInterval`).
const REVISION_INTERVAL: Duration = Duration::from_secs(300);

/// The periodic compactor's state between samples.
pub struct Periodic {
    period: Duration,
    /// Revisions sampled, oldest first; the first is about a period old.
    revs: VecDeque<i64>,
    last_success: Instant,
    /// What must pass since the last success: the period before the first
    /// compaction, then `min(period, 1 h)`.
    base: Duration,
}

impl Periodic {
    pub fn new(period: Duration, now: Instant) -> Periodic {
        Periodic {
            period,
            revs: VecDeque::new(),
            last_success: now,
            base: period,
        }
    }

    /// Time between samples (a tenth of the period, capped at 6 minutes).
    pub fn sample_every(&self) -> Duration {
        self.period.min(Duration::from_secs(3600)) / 10
    }

    /// Records a sample, taken before waiting `sample_every`.
    pub fn sample(&mut self, rev: i64) {
        let keep = (self.period.as_nanos() / self.sample_every().as_nanos().max(1)) as usize + 1;
        self.revs.push_back(rev);
        while self.revs.len() > keep {
            self.revs.pop_front();
        }
    }

    /// After the wait: the revision to compact at now, if it is time (and
    /// this member leads).
    pub fn due(&mut self, now: Instant, leader: bool) -> Option<i64> {
        if !leader || now.saturating_duration_since(self.last_success) < self.base {
            return None;
        }
        self.base = self.period.min(Duration::from_secs(3600));
        self.revs.front().copied().filter(|&r| r > 0)
    }

    /// The compaction went in (or the revision was compacted already).
    pub fn done(&mut self, now: Instant) {
        self.last_success = now;
    }
}

/// Revision mode: where to compact, given the current revision, the
/// retention and where the last compaction was.
pub fn revision_target(current: i64, retention: i64, last: i64) -> Option<i64> {
    let rev = current - retention;
    (rev > 0 && rev != last).then_some(rev)
}

fn leads(core: &Core) -> bool {
    core.view.leader.get() == core.router.member.id
}

/// Compacts at `rev`: true when it went in or `rev` was compacted already.
async fn compact(core: &Core, rev: i64, retention: &str) -> bool {
    crate::info!("Starting auto-compaction at revision {rev} (retention: {retention})");
    let req = CompactionRequest {
        revision: rev,
        physical: false,
    };
    match super::api::compact(core, req).await {
        Ok(_) => {
            crate::info!("Finished auto-compaction at revision {rev}");
            true
        }
        Err(e) if e == crate::error::compacted() => true,
        Err(e) => {
            crate::warn!("Failed auto-compaction at revision {rev}: {}", e.message);
            false
        }
    }
}

/// Runs the compactor `mode` asks for, for as long as the executor runs.
pub async fn run(core: Rc<Core>, mode: AutoCompaction) {
    match mode {
        AutoCompaction::Off => {}
        AutoCompaction::Periodic(period) => {
            let mut p = Periodic::new(period, Instant::now());
            let retention = format!("{period:?}");
            loop {
                p.sample(core.view.revision.get());
                glommio::timer::sleep(p.sample_every()).await;
                if let Some(rev) = p.due(Instant::now(), leads(&core)) {
                    if compact(&core, rev, &retention).await {
                        p.done(Instant::now());
                    }
                }
            }
        }
        AutoCompaction::Revision(retention) => {
            let mut last = 0;
            let label = retention.to_string();
            loop {
                glommio::timer::sleep(REVISION_INTERVAL).await;
                if !leads(&core) {
                    continue;
                }
                if let Some(rev) = revision_target(core.view.revision.get(), retention, last) {
                    if compact(&core, rev, &label).await {
                        last = rev;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periodic_waits_a_period_then_compacts_a_period_back_every_period() {
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        let mut p = Periodic::new(hour, t0);
        assert_eq!(p.sample_every(), Duration::from_secs(360));
        // Samples every 6 minutes, revision growing by 100 each time.
        let mut now = t0;
        let mut compacted = Vec::new();
        for i in 0..25i64 {
            p.sample(1 + i * 100);
            now += p.sample_every();
            if let Some(rev) = p.due(now, true) {
                compacted.push((i, rev));
                p.done(now);
            }
        }
        // First at the 10th wait (an hour in), at the first sample; then
        // every hour, at the sample an hour (10 samples) before.
        assert_eq!(compacted, vec![(9, 1), (19, 901)]);
    }

    #[test]
    fn periodic_over_an_hour_samples_every_6_minutes_and_compacts_hourly() {
        let t0 = Instant::now();
        let mut p = Periodic::new(Duration::from_secs(5 * 3600), t0);
        assert_eq!(p.sample_every(), Duration::from_secs(360));
        let mut now = t0;
        let mut at = Vec::new();
        for i in 0..70i64 {
            p.sample(1 + i);
            now += p.sample_every();
            if let Some(rev) = p.due(now, true) {
                at.push((i, rev));
                p.done(now);
            }
        }
        // The first after 5 hours (50 samples), then hourly; each keeps
        // 5 hours (51 samples) of history.
        assert_eq!(at, vec![(49, 1), (59, 10), (69, 20)]);
    }

    #[test]
    fn periodic_compacts_only_as_leader() {
        let t0 = Instant::now();
        let mut p = Periodic::new(Duration::from_secs(10), t0);
        p.sample(5);
        assert_eq!(p.due(t0 + Duration::from_secs(11), false), None);
        assert_eq!(p.due(t0 + Duration::from_secs(11), true), Some(5));
        // Not done (failed): asked again next time.
        assert_eq!(p.due(t0 + Duration::from_secs(12), true), Some(5));
        p.done(t0 + Duration::from_secs(12));
        assert_eq!(p.due(t0 + Duration::from_secs(13), true), None);
    }

    #[test]
    fn revision_mode_keeps_the_retention_and_skips_repeats() {
        assert_eq!(revision_target(100, 1000, 0), None);
        assert_eq!(revision_target(1500, 1000, 0), Some(500));
        assert_eq!(revision_target(1500, 1000, 500), None);
        assert_eq!(revision_target(1600, 1000, 500), Some(600));
    }
}
