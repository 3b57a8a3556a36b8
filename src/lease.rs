//! The lessor: which leases exist, their TTLs and when they expire.
//!
//! It lives in the applier on core 0 (next to the raft core). Grants and
//! revokes are Raft entries, applied here in log order (and mirrored into
//! every shard, which keeps the lease table so it can check a put's lease
//! locally and checkpoint it). Expiry times are not replicated: they are
//! this member's clock. Keep-alives only move an expiry, so they are
//! answered here without a log write. When a lease expires the lessor
//! proposes its revoke; the keys go away when that entry applies.
//!
//! After a restart every lease gets its whole TTL again (etcd refreshes
//! leases when a member becomes leader, so a failover or a restart never
//! expires leases en masse).
//!
//! Lease checkpoints (etcd's `--experimental-enable-lease-checkpoint`): the
//! leader's lessor looks at each lease one checkpoint interval after it was
//! granted, renewed, checkpointed or the leader took over, and proposes its
//! remaining TTL (whole seconds, rounded up) when that is less than the
//! granted TTL. Every member records the last checkpointed remaining TTL
//! when the entry applies, and a new leader gives a lease that much
//! instead of its whole TTL, so a lease kept alive by nobody expires in
//! about its TTL even when leaders change more often than that. A
//! keep-alive clears it: on the leader through a checkpoint of 0 proposed
//! before it renews, as etcd's `Renew` does, and through the log when it
//! was sent to a follower. As in etcd 3.4, checkpoints are not kept in the
//! lease table on disk: a restarted member has those of the log entries it
//! replays, and one that installs a snapshot starts without them.
//!
//! *Invariant:* the set of leases changes only by applying log entries;
//! expiry only proposes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// etcd's `MaxLeaseTTL`: 9,000,000,000 seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// Revokes proposed per second at most (etcd's `leaseRevokeRate`).
pub const REVOKES_PER_SEC: usize = 1000;
/// How often the lessor looks for expired leases.
pub const EXPIRY_CHECK: Duration = Duration::from_millis(500);

/// etcd's minimum lease TTL: 1.5 election timeouts, rounded up to seconds.
pub fn min_ttl(election_timeout: Duration) -> i64 {
    let ms = election_timeout.as_millis() as i64 * 3 / 2;
    ((ms + 999) / 1000).max(1)
}

/// Lease checkpoints in one log entry at most (etcd's
/// `maxLeaseCheckpointBatchSize`).
pub const CHECKPOINTS_PER_ENTRY: usize = 1000;

#[derive(Debug, Clone)]
struct Lease {
    ttl: i64,
    /// The remaining TTL the last applied checkpoint recorded, in seconds;
    /// 0: none (a new leader gives the whole TTL).
    remaining_ttl: i64,
    expiry: Instant,
    /// When its revoke was last proposed (expired leases only).
    revoking: Option<Instant>,
    /// When the leader's lessor checkpoints it next.
    checkpoint_at: Option<Instant>,
}

pub struct Lessor {
    leases: BTreeMap<i64, Lease>,
    /// The checkpoint interval; `None`: checkpoints are off.
    checkpoint: Option<Duration>,
    /// This is the leader's lessor: it schedules checkpoints.
    primary: bool,
}

impl Lessor {
    /// Leases as recovered (ID → TTL): each gets its whole TTL from now.
    /// `checkpoint`: the lease checkpoint interval, if they are on.
    pub fn new(recovered: &BTreeMap<i64, i64>, checkpoint: Option<Duration>) -> Lessor {
        let now = Instant::now();
        Lessor {
            leases: recovered
                .iter()
                .map(|(&id, &ttl)| (id, Lease::fresh(ttl, now)))
                .collect(),
            checkpoint,
            primary: false,
        }
    }

    pub fn exists(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// Applies a grant. `false` if the ID is taken.
    pub fn grant(&mut self, id: i64, ttl: i64) -> bool {
        if self.leases.contains_key(&id) {
            return false;
        }
        let now = Instant::now();
        let mut l = Lease::fresh(ttl, now);
        l.checkpoint_at = next_checkpoint(self.checkpoint, self.primary, &l, now);
        self.leases.insert(id, l);
        true
    }

    /// Applies a revoke. `false` if there was no such lease.
    pub fn revoke(&mut self, id: i64) -> bool {
        self.leases.remove(&id).is_some()
    }

    /// An unused ID derived from a log index: the same on every member.
    pub fn pick_id(&self, index: u64, prefix: u64) -> i64 {
        let mut id = (((prefix & 0x3fff) << 48) | (index & ((1 << 48) - 1))) as i64;
        while id == 0 || self.leases.contains_key(&id) {
            id = id.wrapping_add(1) & i64::MAX;
        }
        id
    }

    /// A keep-alive: the granted TTL, or 0 when the lease does not exist or
    /// has already expired (as etcd answers). It clears the lease's
    /// checkpointed remaining TTL: on the leader a checkpoint of 0 was
    /// applied before (`checkpointed`), on the others this is applied from
    /// the log.
    pub fn renew(&mut self, id: i64) -> i64 {
        let now = Instant::now();
        match self.leases.get_mut(&id) {
            Some(l) if l.expiry > now => {
                l.remaining_ttl = 0;
                l.expiry = now + secs(l.ttl);
                l.ttl
            }
            _ => 0,
        }
    }

    /// Lease `id` has a checkpointed remaining TTL, which a keep-alive on
    /// the leader clears through the log before it renews (etcd's `Renew`:
    /// at most two checkpoint entries per lease and interval).
    pub fn checkpointed(&self, id: i64) -> bool {
        self.leases
            .get(&id)
            .is_some_and(|l| l.remaining_ttl > 0 && l.expiry > Instant::now())
    }

    /// Applies a checkpoint: the lease's remaining TTL as the leader saw it
    /// (0 clears it). The leader's lessor schedules the next one.
    pub fn apply_checkpoint(&mut self, id: i64, remaining_ttl: i64) {
        let now = Instant::now();
        let (every, primary) = (self.checkpoint, self.primary);
        if let Some(l) = self.leases.get_mut(&id) {
            l.remaining_ttl = remaining_ttl.max(0);
            l.checkpoint_at = next_checkpoint(every, primary, l, now);
        }
    }

    /// Checkpoints due now (lease ID, remaining whole seconds rounded up),
    /// at most `max`, on the leader's lessor: leases whose time is up and
    /// whose remaining TTL is less than their granted TTL (etcd's
    /// `findDueScheduledCheckpoints`). A lease checked here is scheduled
    /// again when its checkpoint applies, or at once when it needs none
    /// yet (renewed meanwhile; etcd 3.4 then checks it again only after
    /// the next leader change).
    pub fn due_checkpoints(&mut self, max: usize) -> Vec<(i64, i64)> {
        let now = Instant::now();
        let mut out = Vec::new();
        if !self.primary {
            return out;
        }
        let every = self.checkpoint;
        for (&id, l) in self.leases.iter_mut() {
            if out.len() >= max {
                break;
            }
            match l.checkpoint_at {
                Some(at) if at <= now => l.checkpoint_at = None,
                _ => continue,
            }
            if l.expiry <= now {
                continue;
            }
            let left = l.expiry - now;
            let remaining = left.as_secs() as i64 + i64::from(left.subsec_nanos() > 0);
            if remaining >= l.ttl {
                l.checkpoint_at = next_checkpoint(every, true, l, now);
                continue;
            }
            out.push((id, remaining));
        }
        out
    }

    /// (granted TTL, remaining whole seconds) of a lease.
    pub fn time_to_live(&self, id: i64) -> Option<(i64, i64)> {
        let l = self.leases.get(&id)?;
        let now = Instant::now();
        let remaining = if l.expiry >= now {
            (l.expiry - now).as_secs() as i64
        } else {
            -((now - l.expiry).as_secs() as i64)
        };
        Some((l.ttl, remaining))
    }

    /// A new leader gives every lease its whole TTL again from now, or
    /// the remaining TTL its last checkpoint recorded (etcd's `Promote`):
    /// deadlines kept by the old leader are not known here, and no lease
    /// may expire just because leadership moved.
    pub fn promote(&mut self) {
        let now = Instant::now();
        self.primary = true;
        for l in self.leases.values_mut() {
            l.expiry = now + secs(l.base_ttl());
            l.revoking = None;
            l.checkpoint_at = next_checkpoint(self.checkpoint, true, l, now);
        }
    }

    /// This member's lessor is no longer the leader's: it schedules no
    /// checkpoints.
    pub fn demote(&mut self) {
        self.primary = false;
        for l in self.leases.values_mut() {
            l.checkpoint_at = None;
        }
    }

    /// Every lease and its granted TTL (snapshots).
    pub fn table(&self) -> BTreeMap<i64, i64> {
        self.leases.iter().map(|(&id, l)| (id, l.ttl)).collect()
    }

    pub fn ids(&self) -> Vec<i64> {
        self.leases.keys().copied().collect()
    }

    /// Expired leases whose revoke should be proposed now (at most `max`);
    /// a revoke still unapplied after `retry` is proposed again.
    pub fn expired(&mut self, max: usize, retry: Duration) -> Vec<i64> {
        let now = Instant::now();
        let mut out = Vec::new();
        for (&id, l) in self.leases.iter_mut() {
            if out.len() >= max {
                break;
            }
            if l.expiry > now {
                continue;
            }
            if l.revoking.map(|t| now - t < retry).unwrap_or(false) {
                continue;
            }
            l.revoking = Some(now);
            out.push(id);
        }
        out
    }
}

impl Lease {
    fn fresh(ttl: i64, now: Instant) -> Lease {
        Lease {
            ttl,
            remaining_ttl: 0,
            expiry: now + secs(ttl),
            revoking: None,
            checkpoint_at: None,
        }
    }

    /// What a new leader gives it: the checkpointed remaining TTL if there
    /// is one, else the whole TTL (etcd's `RemainingTTL`).
    fn base_ttl(&self) -> i64 {
        if self.remaining_ttl > 0 {
            self.remaining_ttl
        } else {
            self.ttl
        }
    }
}

/// When the leader's lessor checkpoints `l` next: one interval (`every`)
/// from now, if a checkpoint could matter (etcd: its remaining TTL is longer
/// than the interval); never on another member's lessor.
fn next_checkpoint(
    every: Option<Duration>,
    primary: bool,
    l: &Lease,
    now: Instant,
) -> Option<Instant> {
    match every {
        Some(every) if primary && l.base_ttl() > every.as_secs() as i64 => Some(now + every),
        _ => None,
    }
}

fn secs(ttl: i64) -> Duration {
    // A TTL is at most MAX_LEASE_TTL seconds (~285 years): fits an Instant.
    Duration::from_secs(ttl.clamp(0, MAX_LEASE_TTL) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_ttl_is_etcds() {
        // etcd defaults: heartbeat 100ms, election 1000ms → 10 ticks,
        // minTTL = 3*10/2 ticks = 1.5s → 2s.
        assert_eq!(min_ttl(Duration::from_millis(1000)), 2);
        assert_eq!(min_ttl(Duration::from_millis(2000)), 3);
        assert_eq!(min_ttl(Duration::from_millis(100)), 1);
    }

    #[test]
    fn grant_renew_revoke() {
        let mut l = Lessor::new(&BTreeMap::new(), None);
        assert!(l.grant(5, 10));
        assert!(!l.grant(5, 20));
        assert_eq!(l.renew(5), 10);
        assert_eq!(l.renew(6), 0);
        let (ttl, rem) = l.time_to_live(5).unwrap();
        assert_eq!(ttl, 10);
        assert!((9..=10).contains(&rem));
        assert!(l.revoke(5));
        assert!(!l.revoke(5));
        assert!(l.time_to_live(5).is_none());
    }

    #[test]
    fn expired_proposes_once_until_retry() {
        let mut l = Lessor::new(&BTreeMap::new(), None);
        l.grant(1, 0); // expires at once
        l.grant(2, 100);
        assert_eq!(l.expired(10, Duration::from_secs(60)), vec![1]);
        assert!(l.expired(10, Duration::from_secs(60)).is_empty());
        assert_eq!(l.expired(10, Duration::ZERO), vec![1]);
        assert_eq!(l.renew(1), 0, "an expired lease cannot be kept alive");
    }

    /// Moves lease `id`'s life on by `by` and makes its checkpoint due.
    fn age(l: &mut Lessor, id: i64, by: Duration) {
        let lease = l.leases.get_mut(&id).unwrap();
        lease.expiry = lease.expiry.checked_sub(by).unwrap();
        if let Some(at) = lease.checkpoint_at.as_mut() {
            *at = Instant::now();
        }
    }

    #[test]
    fn checkpoints_carry_the_remaining_ttl_to_a_new_leader() {
        let every = Some(Duration::from_secs(30));
        let mut leader = Lessor::new(&BTreeMap::new(), every);
        let mut follower = Lessor::new(&BTreeMap::new(), every);
        leader.promote();
        for l in [&mut leader, &mut follower] {
            assert!(l.grant(7, 100));
            assert!(l.grant(8, 20), "shorter than the interval");
        }
        assert!(follower.due_checkpoints(10).is_empty(), "only the leader's");
        age(&mut leader, 7, Duration::from_millis(40_500));
        age(&mut leader, 8, Duration::from_secs(5));
        assert_eq!(leader.due_checkpoints(10), vec![(7, 60)]);
        assert!(leader.due_checkpoints(10).is_empty(), "once until applied");
        for l in [&mut leader, &mut follower] {
            l.apply_checkpoint(7, 60);
            l.apply_checkpoint(99, 5); // no such lease: nothing
        }
        assert!(leader.checkpointed(7) && !leader.checkpointed(8));
        assert!(leader.leases[&7].checkpoint_at.is_some(), "scheduled again");
        // The follower takes over: 60 s left, not the whole 100.
        leader.demote();
        assert!(leader.leases.values().all(|l| l.checkpoint_at.is_none()));
        follower.promote();
        let (ttl, left) = follower.time_to_live(7).unwrap();
        assert_eq!(ttl, 100);
        assert!((59..=60).contains(&left), "{left}");
        assert!((19..=20).contains(&follower.time_to_live(8).unwrap().1));
        // A keep-alive clears it; the next leader gives the whole TTL.
        assert!(follower.checkpointed(7));
        assert_eq!(follower.renew(7), 100);
        assert!(!follower.checkpointed(7));
        leader.apply_checkpoint(7, 0);
        leader.promote();
        assert!((99..=100).contains(&leader.time_to_live(7).unwrap().1));
    }

    #[test]
    fn a_lease_renewed_since_is_checked_again_later() {
        let mut l = Lessor::new(&BTreeMap::new(), Some(Duration::from_secs(30)));
        l.promote();
        l.grant(1, 100);
        age(&mut l, 1, Duration::ZERO);
        assert!(l.due_checkpoints(10).is_empty(), "nothing to record yet");
        assert!(l.leases[&1].checkpoint_at.is_some());
        age(&mut l, 1, Duration::from_secs(10));
        assert_eq!(l.due_checkpoints(10), vec![(1, 90)]);
    }

    #[test]
    fn without_checkpoints_a_new_leader_gives_the_whole_ttl() {
        let mut l = Lessor::new(&BTreeMap::new(), None);
        l.promote();
        l.grant(1, 100);
        age(&mut l, 1, Duration::from_secs(50));
        assert!(l.due_checkpoints(10).is_empty());
        l.promote();
        assert!((99..=100).contains(&l.time_to_live(1).unwrap().1));
    }

    #[test]
    fn picked_ids_are_unused_and_positive() {
        let mut l = Lessor::new(&BTreeMap::new(), None);
        let a = l.pick_id(7, 0xffff_ffff);
        assert!(a > 0);
        l.grant(a, 5);
        let b = l.pick_id(7, 0xffff_ffff);
        assert!(b > 0 && b != a);
    }
}
