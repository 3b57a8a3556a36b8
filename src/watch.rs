//! Watch, shard side: which cores want to hear about which key ranges, and
//! the events a shard sends them.
//!
//! A shard does not know individual watchers. Each core registers the key
//! ranges its watchers cover, once per group of watchers on a range
//! (counted, so a thousand watchers on one prefix are one entry); when the
//! shard applies a change to a key that some core's range covers, it sends
//! that core one copy of the event, and the core's hub (`server::watch`)
//! fans it out to its watchers. A watcher with a start revision, or one
//! catching up after falling behind, asks the shard for history: the shard
//! answers from its index, in chunks.
//!
//! *Ordering contract:* a shard sends its live events to a core before it
//! answers anything that depends on them (a history request, a result to
//! the applier). A core's mailbox is FIFO per sender, so the hub sees a
//! shard's events in apply order and never after the applied index that
//! covers them.

use crate::proto::mvccpb::KeyValue;
use crate::store::index::End;
use std::collections::HashMap;
use std::sync::Arc;

/// A watched key range in etcd's encoding (`range_end` empty: one key;
/// `\0`: every key from `key` on). Shared by the watchers on it, their
/// hub and the shards (an `Arc`, so registering a watcher copies no key).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct WatchRange {
    pub key: Box<[u8]>,
    pub range_end: Box<[u8]>,
}

impl WatchRange {
    pub fn contains(&self, key: &[u8]) -> bool {
        End::from_range_end(&self.range_end).contains(&self.key, key)
    }
}

/// One change in a shard, as a watcher sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardEvent {
    /// The revision (Raft index) of the change.
    pub rev: i64,
    /// Order within the revision: `(op position << 32) | key position`, so
    /// the events of one txn come out in the order its ops ran, as on etcd.
    /// History read back from the index has 0 here and is ordered by key.
    pub sub: u64,
    pub delete: bool,
    /// For a delete: only `key` and `mod_revision` (as etcd sends it).
    pub kv: KeyValue,
    /// The live version before the change, when a watcher asked for it.
    pub prev: Option<KeyValue>,
}

/// What a shard answers to a history request.
#[derive(Debug)]
pub enum History {
    /// The requested start is below the shard's compaction point.
    Compacted(i64),
    Events {
        events: Vec<ShardEvent>,
        /// `Some(rev)`: the answer was cut after revision `rev` (limits);
        /// ask again from `rev + 1`. `None`: every change the shard has
        /// applied is in `events`, and live events follow.
        more: Option<i64>,
    },
}

/// Limits of one history answer: it is cut at a revision boundary once it
/// holds this many events or bytes (always at least one revision).
pub const HISTORY_EVENTS_MAX: usize = 512;
pub const HISTORY_BYTES_MAX: usize = 512 << 10;

/// The key ranges each core watches on one shard, with how many watchers
/// (and how many of them want `prev_kv`) stand behind each.
#[derive(Default)]
pub struct Interests {
    ranges: HashMap<(usize, Arc<WatchRange>), (u32, u32)>,
}

impl Interests {
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn add(&mut self, core: usize, range: &Arc<WatchRange>, prev_kv: bool) {
        let e = self.ranges.entry((core, range.clone())).or_insert((0, 0));
        e.0 += 1;
        e.1 += prev_kv as u32;
    }

    pub fn remove(&mut self, core: usize, range: &Arc<WatchRange>, prev_kv: bool) {
        let k = (core, range.clone());
        if let Some(e) = self.ranges.get_mut(&k) {
            e.0 = e.0.saturating_sub(1);
            e.1 = e.1.saturating_sub(prev_kv as u32);
            if e.0 == 0 {
                self.ranges.remove(&k);
            }
        }
    }

    /// The cores that want to hear about `key`, each with whether any of
    /// its watchers wants `prev_kv`. `out` is cleared first.
    pub fn matches(&self, key: &[u8], out: &mut Vec<(usize, bool)>) {
        out.clear();
        for ((core, range), (_, prev)) in &self.ranges {
            if !range.contains(key) {
                continue;
            }
            match out.iter_mut().find(|(c, _)| c == core) {
                Some(m) => m.1 |= *prev > 0,
                None => out.push((*core, *prev > 0)),
            }
        }
    }
}

/// The events a shard has produced and not yet sent, per core.
#[derive(Default)]
pub struct Outgoing {
    per_core: Vec<Vec<ShardEvent>>,
    pending: bool,
}

impl Outgoing {
    pub fn push(&mut self, core: usize, ev: ShardEvent) {
        if self.per_core.len() <= core {
            self.per_core.resize_with(core + 1, Vec::new);
        }
        self.per_core[core].push(ev);
        self.pending = true;
    }

    pub fn is_empty(&self) -> bool {
        !self.pending
    }

    /// Takes every core's events (cores with none are skipped).
    pub fn take(&mut self) -> Vec<(usize, Vec<ShardEvent>)> {
        self.pending = false;
        self.per_core
            .iter_mut()
            .enumerate()
            .filter(|(_, v)| !v.is_empty())
            .map(|(c, v)| (c, std::mem::take(v)))
            .collect()
    }
}

/// Cuts history (sorted by revision) at a revision boundary once it holds
/// `HISTORY_EVENTS_MAX` events or `HISTORY_BYTES_MAX` bytes; returns the
/// last revision kept when it cut.
pub fn cut_history(events: &mut Vec<ShardEvent>) -> Option<i64> {
    let mut bytes = 0usize;
    for i in 0..events.len() {
        bytes += event_bytes(&events[i]);
        let full = i + 1 >= HISTORY_EVENTS_MAX || bytes >= HISTORY_BYTES_MAX;
        let boundary = events.get(i + 1).map(|n| n.rev != events[i].rev);
        if full && boundary == Some(true) {
            let last = events[i].rev;
            events.truncate(i + 1);
            return Some(last);
        }
    }
    None
}

/// A rough size of an event on the wire, for limits.
pub fn event_bytes(e: &ShardEvent) -> usize {
    let kv = |k: &KeyValue| k.key.len() + k.value.len() + 40;
    kv(&e.kv) + e.prev.as_ref().map(kv).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(rev: i64, key: &str, val_len: usize) -> ShardEvent {
        ShardEvent {
            rev,
            sub: 0,
            delete: false,
            kv: KeyValue {
                key: key.as_bytes().to_vec(),
                mod_revision: rev,
                value: vec![b'v'; val_len],
                ..Default::default()
            },
            prev: None,
        }
    }

    fn r(key: &[u8], range_end: &[u8]) -> Arc<WatchRange> {
        Arc::new(WatchRange {
            key: key.into(),
            range_end: range_end.into(),
        })
    }

    #[test]
    fn interests_count_and_match() {
        let mut i = Interests::default();
        i.add(0, &r(b"a", b"c"), false);
        i.add(0, &r(b"a", b"c"), true);
        i.add(1, &r(b"b", b""), false);
        i.add(1, &r(b"x", b"\0"), false);
        let mut out = Vec::new();
        // (key, expected cores with prev flag, sorted)
        let table: &[(&str, &[(usize, bool)])] = &[
            ("a", &[(0, true)]),
            ("b", &[(0, true), (1, false)]),
            ("c", &[]),
            ("y", &[(1, false)]),
        ];
        for (k, want) in table {
            i.matches(k.as_bytes(), &mut out);
            out.sort();
            assert_eq!(&out, want, "key {k}");
        }
        i.remove(0, &r(b"a", b"c"), true);
        i.matches(b"a", &mut out);
        assert_eq!(out, vec![(0, false)]);
        i.remove(0, &r(b"a", b"c"), false);
        i.matches(b"a", &mut out);
        assert!(out.is_empty());
        i.remove(1, &r(b"b", b""), false);
        i.remove(1, &r(b"x", b"\0"), false);
        assert!(i.is_empty());
    }

    #[test]
    fn history_cuts_only_between_revisions() {
        // Three events at rev 5 straddle the event limit: the cut goes
        // after them, never inside a revision.
        let mut evs: Vec<ShardEvent> = (0..HISTORY_EVENTS_MAX - 1)
            .map(|i| ev(1 + i as i64 / 1000, "k", 1))
            .collect();
        let r = evs.last().unwrap().rev + 1;
        evs.extend((0..3).map(|_| ev(r, "k", 1)));
        evs.push(ev(r + 1, "k", 1));
        let n = evs.len();
        let mut cut = evs.clone();
        assert_eq!(cut_history(&mut cut), Some(r));
        assert_eq!(cut.len(), n - 1);
        // Small histories are not cut.
        let mut small = evs[..10].to_vec();
        assert_eq!(cut_history(&mut small), None);
        // One huge revision is kept whole.
        let mut big = vec![ev(1, "a", HISTORY_BYTES_MAX), ev(1, "b", 10)];
        assert_eq!(cut_history(&mut big), None);
        assert_eq!(big.len(), 2);
        // The byte limit cuts too.
        let mut bytes = vec![ev(1, "a", HISTORY_BYTES_MAX), ev(2, "b", 10)];
        assert_eq!(cut_history(&mut bytes), Some(1));
        assert_eq!(bytes.len(), 1);
    }
}
