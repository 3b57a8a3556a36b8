//! The in-memory MVCC index of one shard: key → its revisions.
//!
//! A key's history is a list of versions in revision order. A put appends a
//! live version; a delete appends a tombstone. The versions between a first
//! put (or a put after a tombstone) and the next tombstone form what etcd's
//! keyIndex calls a generation: `create_rev` is the generation's first
//! revision and `version` counts puts within it, so both are stored with each
//! version and never recomputed.
//!
//! Compaction at `rev` drops, per key, every version at or below `rev` except
//! the newest one, and drops that one too when it is a tombstone (etcd's
//! `keyIndex.compact`). Reading at any revision >= `rev` is unchanged by it.
//!
//! The index does not hold values: a version keeps what stands for its
//! value (`Version<V>`), and the shard's index keeps `segment::Loc`, where
//! the bytes are in the shard's segment files (48 bytes per version, with
//! the revisions). Snapshots, hashes and restore use the owned form,
//! `Version` (= `Version<Box<[u8]>>`).
//!
//! *Invariant:* versions of a key are strictly increasing in `mod_rev`; the
//! apply path never writes a key twice in one revision (etcd forbids a txn to
//! touch a key twice), so one revision is one version.

use std::collections::BTreeMap;
use std::ops::Bound;

pub type Rev = i64;

/// One version of a key. `V` is what stands for the value: the bytes
/// themselves (`Box<[u8]>`, the default: snapshots, hashes, restore), a
/// borrowed slice (records being encoded or parsed), or where the bytes
/// are in the shard's segments (`segment::Loc`, what the index keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version<V = Box<[u8]>> {
    pub mod_rev: Rev,
    /// 0 for a tombstone.
    pub create_rev: Rev,
    /// Number of puts in this generation so far; 0 for a tombstone.
    pub version: i64,
    pub lease: i64,
    /// `None` marks a tombstone.
    pub value: Option<V>,
}

impl<V> Version<V> {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// The same version with its value turned into another form (a
    /// tombstone stays a tombstone).
    pub fn map_value<W, F: FnOnce(V) -> W>(self, f: F) -> Version<W> {
        Version {
            mod_rev: self.mod_rev,
            create_rev: self.create_rev,
            version: self.version,
            lease: self.lease,
            value: self.value.map(f),
        }
    }

    /// The same version with its value borrowed as bytes.
    pub fn as_bytes(&self) -> Version<&[u8]>
    where
        V: AsRef<[u8]>,
    {
        Version {
            mod_rev: self.mod_rev,
            create_rev: self.create_rev,
            version: self.version,
            lease: self.lease,
            value: self.value.as_ref().map(|v| v.as_ref()),
        }
    }
}

/// The end of a key range, in etcd's encoding of `range_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End<'a> {
    /// `range_end` empty: only `key` itself.
    Single,
    /// `range_end` is `\0`: every key >= `key`.
    Unbounded,
    /// `[key, end)`.
    Before(&'a [u8]),
}

impl<'a> End<'a> {
    pub fn from_range_end(range_end: &'a [u8]) -> End<'a> {
        match range_end {
            [] => End::Single,
            [0] => End::Unbounded,
            e => End::Before(e),
        }
    }

    pub fn contains(&self, start: &[u8], key: &[u8]) -> bool {
        match self {
            End::Single => key == start,
            End::Unbounded => key >= start,
            End::Before(e) => key >= start && key < *e,
        }
    }
}

/// The index of one shard. `V` is what a version keeps of its value: the
/// shard keeps `segment::Loc`, where the bytes are in its segment files.
pub struct Index<V> {
    keys: BTreeMap<Box<[u8]>, Vec<Version<V>>>,
}

impl<V> Default for Index<V> {
    fn default() -> Self {
        Index {
            keys: BTreeMap::new(),
        }
    }
}

impl<V> Index<V> {
    pub fn new() -> Index<V> {
        Index::default()
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The newest version of `key` at or below `rev`, if it is live.
    pub fn get(&self, key: &[u8], rev: Rev) -> Option<&Version<V>> {
        self.keys.get(key).and_then(|h| visible(h, rev))
    }

    /// The newest live version now (what a write in progress sees).
    pub fn latest(&self, key: &[u8]) -> Option<&Version<V>> {
        self.get(key, Rev::MAX)
    }

    /// Calls `f` for every key in `[key, end)` live at `rev`, in key order,
    /// until `f` returns false.
    pub fn range<F>(&self, key: &[u8], end: End<'_>, rev: Rev, mut f: F)
    where
        F: FnMut(&[u8], &Version<V>) -> bool,
    {
        for (k, h) in self.histories(key, end) {
            if let Some(v) = visible(h, rev) {
                if !f(k, v) {
                    return;
                }
            }
        }
    }

    /// The histories of the keys in `[key, end)`, in key order (no
    /// allocation: reads of one key are the hot path).
    fn histories<'a>(&'a self, key: &'a [u8], end: End<'a>) -> Histories<'a, V> {
        let upper: Bound<&[u8]> = match end {
            End::Single => return Histories::One(self.keys.get_key_value(key)),
            End::Unbounded => Bound::Unbounded,
            End::Before(e) if e <= key => return Histories::One(None),
            End::Before(e) => Bound::Excluded(e),
        };
        Histories::Many(self.keys.range::<[u8], _>((Bound::Included(key), upper)))
    }

    /// Records a put of `key` at `rev` and returns the new version.
    pub fn put(&mut self, key: &[u8], rev: Rev, value: V, lease: i64) -> &Version<V> {
        self.put_with(key, rev, lease, |_, _| value)
    }

    /// Records a put of `key` at `rev` whose value is made by `value` from
    /// the new version's `(create_rev, version)`: the shard writes the
    /// record there and keeps where it went, with one lookup of the key.
    pub fn put_with<F>(&mut self, key: &[u8], rev: Rev, lease: i64, value: F) -> &Version<V>
    where
        F: FnOnce(Rev, i64) -> V,
    {
        let hist = self.history_mut(key);
        let (create_rev, version) = match hist.last() {
            Some(v) if !v.is_tombstone() => (v.create_rev, v.version + 1),
            _ => (rev, 1),
        };
        debug_assert!(hist.last().map(|v| v.mod_rev < rev).unwrap_or(true));
        hist.push(Version {
            mod_rev: rev,
            create_rev,
            version,
            lease,
            value: Some(value(create_rev, version)),
        });
        hist.last().expect("just pushed")
    }

    /// Records a put of `key` at `rev` with one lookup of the key (the put
    /// path of the shard). `f` gets the live version before it, if any,
    /// and the new version's `(create_rev, version)`, and returns the new
    /// version's lease and value. Returns that previous live version and
    /// the new one.
    pub fn put_after<F>(&mut self, key: &[u8], rev: Rev, f: F) -> (Option<Version<V>>, Version<V>)
    where
        V: Copy,
        F: FnOnce(Option<&Version<V>>, Rev, i64) -> (i64, V),
    {
        fn push<V: Copy>(
            hist: &mut Vec<Version<V>>,
            rev: Rev,
            f: impl FnOnce(Option<&Version<V>>, Rev, i64) -> (i64, V),
        ) -> (Option<Version<V>>, Version<V>) {
            let prev = hist.last().filter(|v| !v.is_tombstone()).copied();
            debug_assert!(hist.last().map(|v| v.mod_rev < rev).unwrap_or(true));
            let (create_rev, version) = match &prev {
                Some(v) => (v.create_rev, v.version + 1),
                None => (rev, 1),
            };
            let (lease, value) = f(prev.as_ref(), create_rev, version);
            let v = Version {
                mod_rev: rev,
                create_rev,
                version,
                lease,
                value: Some(value),
            };
            hist.push(v);
            (prev, v)
        }
        if let Some(hist) = self.keys.get_mut(key) {
            return push(hist, rev, f);
        }
        // A new key's history starts with room for one version (most keys
        // never get a second).
        let mut hist = Vec::with_capacity(1);
        let out = push(&mut hist, rev, f);
        self.keys.insert(key.into(), hist);
        out
    }

    /// Calls `f` for every version of every key, keys in order and each
    /// key's versions oldest first, with the version mutable (only its
    /// value's location is to change: `Shard::defrag`).
    pub fn for_each_mut<F: FnMut(&[u8], &mut Version<V>)>(&mut self, mut f: F) {
        for (k, hist) in self.keys.iter_mut() {
            for v in hist.iter_mut() {
                f(k, v);
            }
        }
    }

    /// Restores a version read back from a segment (recovery).
    pub fn restore(&mut self, key: &[u8], v: Version<V>) {
        self.history_mut(key).push(v);
    }

    fn history_mut(&mut self, key: &[u8]) -> &mut Vec<Version<V>> {
        // Look up by slice first: most puts hit an existing key and must
        // not allocate a boxed key. A new key's history starts with room
        // for one version (most keys never get a second); a plain `push`
        // would reserve four (192 bytes of `Version<Loc>`). Growth after
        // that is `Vec`'s doubling.
        if self.keys.get(key).is_none() {
            self.keys.insert(key.into(), Vec::with_capacity(1));
        }
        self.keys.get_mut(key).expect("present")
    }

    /// Records a delete of `key` at `rev`; false if the key was not live.
    pub fn tombstone(&mut self, key: &[u8], rev: Rev) -> bool {
        match self.keys.get_mut(key) {
            Some(h) if h.last().map(|v| !v.is_tombstone()).unwrap_or(false) => {
                h.push(Version {
                    mod_rev: rev,
                    create_rev: 0,
                    version: 0,
                    lease: 0,
                    value: None,
                });
                true
            }
            _ => false,
        }
    }

    /// Drops history at or below `rev` as etcd's compaction does.
    pub fn compact(&mut self, rev: Rev) {
        self.keys.retain(|_, hist| {
            // Position of the newest version at or below rev.
            let n = hist.partition_point(|v| v.mod_rev <= rev);
            if n == 0 {
                return true;
            }
            let keep_from = if hist[n - 1].is_tombstone() { n } else { n - 1 };
            hist.drain(..keep_from);
            hist.shrink_to_fit();
            !hist.is_empty()
        });
    }

    /// The version of `key` written at exactly `rev` and the live version
    /// before it (for a watch event's prev_kv), if `rev` is still in the
    /// index.
    pub fn version_at(&self, key: &[u8], rev: Rev) -> Option<(&Version<V>, Option<&Version<V>>)> {
        let hist = self.keys.get(key)?;
        let i = hist.binary_search_by_key(&rev, |v| v.mod_rev).ok()?;
        let prev = i
            .checked_sub(1)
            .map(|p| &hist[p])
            .filter(|v| !v.is_tombstone());
        Some((&hist[i], prev))
    }

    /// Calls `f(key, version, prev)` for every version with `mod_rev >=
    /// from` of every key in `[key, end)`, in key order (tombstones
    /// included); `prev` is the live version before it, if any.
    pub fn versions_since<F>(&self, key: &[u8], end: End<'_>, from: Rev, mut f: F)
    where
        F: FnMut(&[u8], &Version<V>, Option<&Version<V>>),
    {
        for (k, hist) in self.histories(key, end) {
            let i = hist.partition_point(|v| v.mod_rev < from);
            for j in i..hist.len() {
                let prev = j
                    .checked_sub(1)
                    .map(|p| &hist[p])
                    .filter(|v| !v.is_tombstone());
                f(k, &hist[j], prev);
            }
        }
    }

    /// Calls `f` for every version of every key, in key order and, per
    /// key, oldest first (snapshots).
    pub fn for_each<F: FnMut(&[u8], &Version<V>)>(&self, mut f: F) {
        for (k, hist) in &self.keys {
            for v in hist {
                f(k, v);
            }
        }
    }

    /// Every version of `key`, oldest first (tests and tools).
    pub fn history(&self, key: &[u8]) -> &[Version<V>] {
        self.keys.get(key).map(|h| h.as_slice()).unwrap_or(&[])
    }
}

type History<V> = Vec<Version<V>>;

enum Histories<'a, V> {
    One(Option<(&'a Box<[u8]>, &'a History<V>)>),
    Many(std::collections::btree_map::Range<'a, Box<[u8]>, History<V>>),
}

impl<'a, V> Iterator for Histories<'a, V> {
    type Item = (&'a [u8], &'a History<V>);
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Histories::One(o) => o.take().map(|(k, h)| (&k[..], h)),
            Histories::Many(r) => r.next().map(|(k, h)| (&k[..], h)),
        }
    }
}

fn visible<V>(hist: &[Version<V>], rev: Rev) -> Option<&Version<V>> {
    let n = hist.partition_point(|v| v.mod_rev <= rev);
    if n == 0 {
        return None;
    }
    let v = &hist[n - 1];
    if v.is_tombstone() {
        None
    } else {
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests keep the bytes in the index: what it stores does not
    /// change how it answers.
    type Ix = Index<Box<[u8]>>;

    fn val(s: &str) -> Box<[u8]> {
        s.as_bytes().into()
    }

    /// The worked example from etcd's keyIndex comment: puts at 1, 2, a
    /// delete at 3 (generation 1), puts at 4, 5, a delete at 6 (generation 2),
    /// puts at 7, 8 (generation 3, open).
    fn example() -> Ix {
        let mut ix = Ix::new();
        ix.put(b"foo", 1, val("a"), 0);
        ix.put(b"foo", 2, val("b"), 0);
        assert!(ix.tombstone(b"foo", 3));
        ix.put(b"foo", 4, val("c"), 0);
        ix.put(b"foo", 5, val("d"), 0);
        assert!(ix.tombstone(b"foo", 6));
        ix.put(b"foo", 7, val("e"), 0);
        ix.put(b"foo", 8, val("f"), 0);
        ix
    }

    #[test]
    fn generations_and_reads() {
        let ix = example();
        // (read rev, expected (value, create_rev, version) or None)
        let table: &[(Rev, Option<(&str, Rev, i64)>)] = &[
            (0, None),
            (1, Some(("a", 1, 1))),
            (2, Some(("b", 1, 2))),
            (3, None),
            (4, Some(("c", 4, 1))),
            (5, Some(("d", 4, 2))),
            (6, None),
            (7, Some(("e", 7, 1))),
            (8, Some(("f", 7, 2))),
            (100, Some(("f", 7, 2))),
        ];
        for (rev, want) in table {
            let got = ix.get(b"foo", *rev).map(|v| {
                (
                    std::str::from_utf8(v.value.as_deref().unwrap()).unwrap(),
                    v.create_rev,
                    v.version,
                )
            });
            assert_eq!(got, *want, "read at {rev}");
        }
    }

    #[test]
    fn compaction_like_etcd() {
        // (compact at, mod revisions left)
        let table: &[(Rev, &[Rev])] = &[
            (1, &[1, 2, 3, 4, 5, 6, 7, 8]),
            (2, &[2, 3, 4, 5, 6, 7, 8]),
            (3, &[4, 5, 6, 7, 8]),
            (4, &[4, 5, 6, 7, 8]),
            (5, &[5, 6, 7, 8]),
            (6, &[7, 8]),
            (7, &[7, 8]),
            (8, &[8]),
        ];
        for (at, left) in table {
            let mut ix = example();
            let before: Vec<Option<Version>> =
                (*at..=9).map(|r| ix.get(b"foo", r).cloned()).collect();
            ix.compact(*at);
            let revs: Vec<Rev> = ix.history(b"foo").iter().map(|v| v.mod_rev).collect();
            assert_eq!(&revs, left, "compact at {at}");
            let after: Vec<Option<Version>> =
                (*at..=9).map(|r| ix.get(b"foo", r).cloned()).collect();
            assert_eq!(before, after, "reads at or above {at} unchanged");
        }
    }

    #[test]
    fn compaction_removes_dead_keys() {
        let mut ix = Ix::new();
        ix.put(b"a", 1, val("x"), 0);
        ix.tombstone(b"a", 2);
        ix.put(b"b", 3, val("y"), 0);
        ix.compact(2);
        assert_eq!(ix.key_count(), 1);
        ix.compact(3);
        assert_eq!(ix.key_count(), 1);
        assert_eq!(ix.get(b"b", 3).unwrap().version, 1);
    }

    #[test]
    fn ranges() {
        let mut ix = Ix::new();
        for (i, k) in ["a", "b", "c", "d"].iter().enumerate() {
            ix.put(k.as_bytes(), i as Rev + 1, val(k), 0);
        }
        ix.tombstone(b"c", 5);
        let collect = |ix: &Ix, key: &[u8], end: End, rev: Rev| {
            let mut out = Vec::new();
            ix.range(key, end, rev, |k, _| {
                out.push(String::from_utf8(k.to_vec()).unwrap());
                true
            });
            out.join(",")
        };
        let table: &[(&[u8], End, Rev, &str)] = &[
            (b"a", End::Single, 5, "a"),
            (b"c", End::Single, 5, ""),
            (b"c", End::Single, 4, "c"),
            (b"a", End::Before(b"c"), 5, "a,b"),
            (b"b", End::Unbounded, 5, "b,d"),
            (b"b", End::Unbounded, 4, "b,c,d"),
            (b"a", End::Unbounded, 2, "a,b"),
            (b"c", End::Before(b"a"), 5, ""),
        ];
        for (key, end, rev, want) in table {
            assert_eq!(
                collect(&ix, key, *end, *rev),
                *want,
                "{key:?} {end:?} @{rev}"
            );
        }
    }

    /// Property: after random puts, deletes and compactions the index answers
    /// every read at or above the compaction point like a naive model.
    #[test]
    fn matches_model() {
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _round in 0..50 {
            let mut ix = Ix::new();
            // model: per rev, full map state
            let mut states: Vec<std::collections::BTreeMap<u8, (Rev, i64)>> =
                vec![Default::default()];
            let mut compacted = 0;
            for rev in 1..200 {
                let mut st = states.last().unwrap().clone();
                let k = (next() % 8) as u8;
                if next() % 3 == 0 {
                    if ix.tombstone(&[k], rev) {
                        st.remove(&k);
                    }
                } else {
                    let v = ix.put(&[k], rev, val("v"), 0).clone();
                    let e = st.entry(k).or_insert((rev, 0));
                    e.1 += 1;
                    assert_eq!((v.create_rev, v.version), *e);
                }
                states.push(st);
                if next() % 20 == 0 {
                    // Compaction never moves backwards (the store refuses it).
                    compacted = compacted.max(rev - (next() % 5) as Rev);
                    ix.compact(compacted);
                }
            }
            for (rev, st) in states.iter().enumerate().skip(compacted.max(0) as usize) {
                for k in 0..8u8 {
                    let got = ix.get(&[k], rev as Rev).map(|v| (v.create_rev, v.version));
                    assert_eq!(got, st.get(&k).copied(), "key {k} at {rev}");
                }
            }
        }
    }

    /// A key written once keeps a history of capacity 1 (not the 4 a first
    /// `push` reserves); later versions grow it as `Vec` does.
    #[test]
    fn new_key_history_has_room_for_one() {
        let mut ix = Ix::new();
        ix.put(b"once", 1, val("a"), 0);
        ix.restore(
            b"restored",
            Version {
                mod_rev: 2,
                create_rev: 2,
                version: 1,
                lease: 0,
                value: Some(val("b")),
            },
        );
        for key in [&b"once"[..], b"restored"] {
            assert_eq!(ix.keys[key].capacity(), 1, "{key:?}");
        }
        ix.put(b"once", 3, val("c"), 0);
        assert_eq!(ix.history(b"once").len(), 2);
        assert!(ix.keys[&b"once"[..]].capacity() >= 2);
    }

    /// What the shard keeps per version: four i64 and where the value is.
    /// Each byte here is a megabyte at a million versions.
    #[test]
    fn version_of_a_location_is_48_bytes() {
        use crate::store::segment::Loc;
        assert!(std::mem::size_of::<Version<Loc>>() <= 48);
    }

    /// `put_after` (the shard's one-lookup put) gives what `latest` and
    /// `put` give, generation by generation: a first put, a second, a put
    /// after a tombstone, a put on a new key.
    #[test]
    fn put_after_matches_latest_then_put() {
        let mut a: Index<u32> = Index::new();
        let mut b: Index<u32> = Index::new();
        let steps: &[(&[u8], Rev, Option<u32>, i64)] = &[
            (b"k", 2, Some(1), 0),
            (b"k", 3, Some(2), 7),
            (b"k", 4, None, 0),
            (b"k", 6, Some(3), 0),
            (b"j", 7, Some(4), 9),
            (b"k", 8, Some(5), 7),
        ];
        for &(k, rev, val, lease) in steps {
            let Some(val) = val else {
                a.tombstone(k, rev);
                b.tombstone(k, rev);
                continue;
            };
            let want_prev = b.latest(k).copied();
            let want = *b.put(k, rev, val, lease);
            let mut seen = None;
            let (prev, got) = a.put_after(k, rev, |p, c, v| {
                seen = Some((p.copied(), c, v));
                (lease, val)
            });
            assert_eq!(prev, want_prev, "prev at {rev}");
            assert_eq!(got, want, "new at {rev}");
            assert_eq!(seen, Some((want_prev, want.create_rev, want.version)));
            assert_eq!(a.history(k), b.history(k));
        }
    }
}
