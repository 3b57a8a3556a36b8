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

#[derive(Debug, Clone)]
struct Lease {
    ttl: i64,
    expiry: Instant,
    /// When its revoke was last proposed (expired leases only).
    revoking: Option<Instant>,
}

pub struct Lessor {
    leases: BTreeMap<i64, Lease>,
}

impl Lessor {
    /// Leases as recovered (ID → TTL): each gets its whole TTL from now.
    pub fn new(recovered: &BTreeMap<i64, i64>) -> Lessor {
        let now = Instant::now();
        Lessor {
            leases: recovered
                .iter()
                .map(|(&id, &ttl)| (id, Lease::fresh(ttl, now)))
                .collect(),
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
        self.leases.insert(id, Lease::fresh(ttl, Instant::now()));
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
    /// has already expired (as etcd answers).
    pub fn renew(&mut self, id: i64) -> i64 {
        let now = Instant::now();
        match self.leases.get_mut(&id) {
            Some(l) if l.expiry > now => {
                l.expiry = now + secs(l.ttl);
                l.ttl
            }
            _ => 0,
        }
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

    /// A new leader gives every lease its whole TTL again from now (etcd's
    /// `Promote`): deadlines kept by the old leader are not known here, and
    /// no lease may expire just because leadership moved.
    pub fn refresh_all(&mut self) {
        let now = Instant::now();
        for l in self.leases.values_mut() {
            *l = Lease::fresh(l.ttl, now);
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
            expiry: now + secs(ttl),
            revoking: None,
        }
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
        let mut l = Lessor::new(&BTreeMap::new());
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
        let mut l = Lessor::new(&BTreeMap::new());
        l.grant(1, 0); // expires at once
        l.grant(2, 100);
        assert_eq!(l.expired(10, Duration::from_secs(60)), vec![1]);
        assert!(l.expired(10, Duration::from_secs(60)).is_empty());
        assert_eq!(l.expired(10, Duration::ZERO), vec![1]);
        assert_eq!(l.renew(1), 0, "an expired lease cannot be kept alive");
    }

    #[test]
    fn picked_ids_are_unused_and_positive() {
        let mut l = Lessor::new(&BTreeMap::new());
        let a = l.pick_id(7, 0xffff_ffff);
        assert!(a > 0);
        l.grant(a, 5);
        let b = l.pick_id(7, 0xffff_ffff);
        assert!(b > 0 && b != a);
    }
}
