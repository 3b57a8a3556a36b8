//! What `/metrics` counts beyond the RPC counts: etcd's mvcc operation
//! counters, failed proposals, /health answers and the WAL's sync
//! latencies. Each core's thread keeps its own `Counts` (a thread-local:
//! the applier, the raft core, a shard or a connection adds to the set of
//! the core it runs on, with no sharing between cores); /metrics asks
//! every core for a copy of its set (`CoreMsg::Rpcs`) and adds them up.

use std::cell::RefCell;

/// etcd's buckets for its disk latency histograms
/// (`prometheus.ExponentialBuckets(0.001, 2, 14)`): 1 ms doubling to 8.192 s.
pub const DISK_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192,
];

/// A Prometheus histogram over `DISK_BUCKETS`: per-bucket counts (not yet
/// cumulative), the number of observations and their sum in seconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    pub buckets: [u64; 14],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, secs: f64) {
        if let Some(i) = DISK_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += secs;
    }

    fn add(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a += b;
        }
        self.count += o.count;
        self.sum += o.sum;
    }

    /// The text exposition of this histogram as `name`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        let mut below = 0;
        for (b, n) in DISK_BUCKETS.iter().zip(self.buckets) {
            below += n;
            out.push_str(&format!("{name}_bucket{{le=\"{b}\"}} {below}\n"));
        }
        out.push_str(&format!(
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}\n",
            self.count, self.sum, self.count
        ));
    }
}

/// One core's counts since the process started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    /// etcd's `etcd_mvcc_range_total`, `_put_total`, `_delete_total` and
    /// `_txn_total` (see `mvcc_txn`).
    pub ranges: u64,
    pub puts: u64,
    pub deletes: u64,
    pub txns: u64,
    /// Writes that never got an answer from the log: refused by the raft
    /// core (no leader, stopping) or timed out (`etcd_server_proposals_failed_total`).
    pub proposals_failed: u64,
    /// /health answers (`etcd_server_health_success` and `_failures`).
    pub health_ok: u64,
    pub health_failed: u64,
    /// The WAL's durable batch writes (`RWF_DSYNC`), as etcd times its
    /// fdatasync (`etcd_disk_wal_fsync_duration_seconds`).
    pub wal_fsync: Histogram,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.ranges += o.ranges;
        self.puts += o.puts;
        self.deletes += o.deletes;
        self.txns += o.txns;
        self.proposals_failed += o.proposals_failed;
        self.health_ok += o.health_ok;
        self.health_failed += o.health_failed;
        self.wal_fsync.add(&o.wal_fsync);
    }
}

thread_local! {
    static LOCAL: RefCell<Counts> = RefCell::default();
}

/// Adds to this thread's counts.
pub fn count(f: impl FnOnce(&mut Counts)) {
    LOCAL.with(|c| f(&mut c.borrow_mut()))
}

/// A copy of this thread's counts.
pub fn local() -> Counts {
    LOCAL.with(|c| c.borrow().clone())
}

/// One etcd mvcc transaction (etcd's `metricsTxnWrite.End`): its ranges,
/// puts and deletes add to their totals, and it counts as a txn when it
/// did more than one of them.
pub fn mvcc_txn(ranges: u64, puts: u64, deletes: u64) {
    if ranges + puts + deletes == 0 {
        return;
    }
    count(|c| {
        c.ranges += ranges;
        c.puts += puts;
        c.deletes += deletes;
        if ranges + puts + deletes > 1 {
            c.txns += 1;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_exposition() {
        let mut h = Histogram::default();
        for s in [0.0005, 0.001, 0.003, 10.0] {
            h.observe(s);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.001\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.002\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.004\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"8.192\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count 4\n"), "{out}");
        assert!(out.contains("# TYPE x histogram\n"), "{out}");
    }

    #[test]
    fn an_mvcc_transaction_of_more_than_one_operation_is_a_txn() {
        std::thread::spawn(|| {
            mvcc_txn(0, 1, 0);
            mvcc_txn(1, 1, 0);
            mvcc_txn(0, 0, 0);
            mvcc_txn(2, 0, 3);
            let c = local();
            assert_eq!((c.ranges, c.puts, c.deletes, c.txns), (3, 2, 3, 2));
        })
        .join()
        .unwrap();
    }
}
