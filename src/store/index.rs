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

/// The longest key kept in place in the index's tree nodes.
const KEY_INLINE_MAX: usize = 22;

/// A key as the index keeps it: up to `KEY_INLINE_MAX` bytes in place in
/// the tree node (no allocation of its own, and a lookup compares it
/// without following a pointer to another cache line), longer ones boxed.
/// Ordered as its bytes are.
#[derive(Clone)]
enum Key {
    Inline {
        len: u8,
        bytes: [u8; KEY_INLINE_MAX],
    },
    Boxed(Box<[u8]>),
}

impl Key {
    fn as_slice(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..*len as usize],
            Key::Boxed(b) => b,
        }
    }
}

impl From<&[u8]> for Key {
    fn from(k: &[u8]) -> Key {
        if k.len() <= KEY_INLINE_MAX {
            let mut bytes = [0u8; KEY_INLINE_MAX];
            bytes[..k.len()].copy_from_slice(k);
            Key::Inline {
                len: k.len() as u8,
                bytes,
            }
        } else {
            Key::Boxed(k.into())
        }
    }
}

/// A key as the tree looks it up: bytes, ordered as `[u8]` is, but
/// compared by `cmp_keys` (a lookup compares about 20 keys on its way down
/// a tree of 100k, and `[u8]`'s comparison is a `memcmp` call each).
#[repr(transparent)]
#[derive(PartialEq, Eq)]
struct KeyQ([u8]);

impl KeyQ {
    fn new(k: &[u8]) -> &KeyQ {
        // SAFETY: `KeyQ` is `repr(transparent)` over `[u8]`.
        unsafe { &*(k as *const [u8] as *const KeyQ) }
    }
}

impl PartialOrd for KeyQ {
    fn partial_cmp(&self, other: &KeyQ) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for KeyQ {
    fn cmp(&self, other: &KeyQ) -> std::cmp::Ordering {
        cmp_keys(&self.0, &other.0)
    }
}

/// `a.cmp(b)` for byte strings, with the first 8 bytes of two keys at
/// least that long compared as one big-endian integer.
#[inline]
fn cmp_keys(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    if let (Some(x), Some(y)) = (a.first_chunk::<8>(), b.first_chunk::<8>()) {
        let (x, y) = (u64::from_be_bytes(*x), u64::from_be_bytes(*y));
        if x != y {
            return x.cmp(&y);
        }
        return a[8..].cmp(&b[8..]);
    }
    a.cmp(b)
}

impl std::borrow::Borrow<KeyQ> for Key {
    fn borrow(&self) -> &KeyQ {
        KeyQ::new(self.as_slice())
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.as_slice() == other.as_slice()
    }
}
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Key {
    #[inline]
    fn cmp(&self, other: &Key) -> std::cmp::Ordering {
        if let (Key::Inline { len: la, bytes: a }, Key::Inline { len: lb, bytes: b }) =
            (self, other)
        {
            // Two zero-padded arrays compare as the keys do, except a key
            // and itself followed by zeros, which the lengths tell apart;
            // the first 8 bytes go as one big-endian integer, whatever the
            // keys' lengths.
            let x = u64::from_be_bytes(a[..8].try_into().expect("8 bytes"));
            let y = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
            if x != y {
                return x.cmp(&y);
            }
            return a[8..].cmp(&b[8..]).then(la.cmp(lb));
        }
        cmp_keys(self.as_slice(), other.as_slice())
    }
}

/// The versions of one key, oldest first, never empty. A key with one
/// version (most keys, and every key after a compaction) keeps it in the
/// tree node, with no allocation and no pointer to follow.
enum Hist<V> {
    One(Version<V>),
    Many(Vec<Version<V>>),
}

impl<V> Hist<V> {
    fn as_slice(&self) -> &[Version<V>] {
        match self {
            Hist::One(v) => std::slice::from_ref(v),
            Hist::Many(vs) => vs,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Version<V>] {
        match self {
            Hist::One(v) => std::slice::from_mut(v),
            Hist::Many(vs) => vs,
        }
    }

    fn push(&mut self, v: Version<V>) {
        if let Hist::Many(vs) = self {
            vs.push(v);
            return;
        }
        // A second version: room for four, as a `Vec` grows from one.
        let mut vs = Vec::with_capacity(4);
        if let Hist::One(first) = std::mem::replace(self, Hist::Many(Vec::new())) {
            vs.push(first);
        }
        vs.push(v);
        *self = Hist::Many(vs);
    }

    /// Drops the versions before `from`; false if none is left.
    fn drop_before(&mut self, from: usize) -> bool {
        match self {
            Hist::One(_) => from == 0,
            Hist::Many(vs) => {
                vs.drain(..from);
                if vs.len() == 1 {
                    if let Some(v) = vs.pop() {
                        *self = Hist::One(v);
                    }
                } else {
                    vs.shrink_to_fit();
                }
                !self.as_slice().is_empty()
            }
        }
    }
}

/// The index of one shard. `V` is what a version keeps of its value: the
/// shard keeps `segment::Loc`, where the bytes are in its segment files.
pub struct Index<V> {
    keys: BTreeMap<Key, Hist<V>>,
    /// Keys whose newest version is not a tombstone.
    live: usize,
}

impl<V> Default for Index<V> {
    fn default() -> Self {
        Index {
            keys: BTreeMap::new(),
            live: 0,
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

    /// Keys live now (etcd's `etcd_debugging_mvcc_keys_total`).
    pub fn live_keys(&self) -> usize {
        self.live
    }

    /// The newest version of `key` at or below `rev`, if it is live.
    pub fn get(&self, key: &[u8], rev: Rev) -> Option<&Version<V>> {
        self.keys
            .get(KeyQ::new(key))
            .and_then(|h| visible(h.as_slice(), rev))
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
            if let Some(v) = visible(h.as_slice(), rev) {
                if !f(k, v) {
                    return;
                }
            }
        }
    }

    /// The histories of the keys in `[key, end)`, in key order (no
    /// allocation: reads of one key are the hot path).
    fn histories<'a>(&'a self, key: &'a [u8], end: End<'a>) -> Histories<'a, V> {
        let upper: Bound<&KeyQ> = match end {
            End::Single => return Histories::One(self.keys.get_key_value(KeyQ::new(key))),
            End::Unbounded => Bound::Unbounded,
            End::Before(e) if e <= key => return Histories::One(None),
            End::Before(e) => Bound::Excluded(KeyQ::new(e)),
        };
        Histories::Many(
            self.keys
                .range::<KeyQ, _>((Bound::Included(KeyQ::new(key)), upper)),
        )
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
        fn next<V>(hist: &[Version<V>], rev: Rev) -> (Rev, i64) {
            debug_assert!(hist.last().map(|v| v.mod_rev < rev).unwrap_or(true));
            match hist.last() {
                Some(v) if !v.is_tombstone() => (v.create_rev, v.version + 1),
                _ => (rev, 1),
            }
        }
        let make = |(create_rev, version): (Rev, i64)| Version {
            mod_rev: rev,
            create_rev,
            version,
            lease,
            value: Some(value(create_rev, version)),
        };
        if self.keys.get(KeyQ::new(key)).is_none() {
            let v = make((rev, 1));
            self.keys.insert(key.into(), Hist::One(v));
            self.live += 1;
        } else if let Some(hist) = self.keys.get_mut(KeyQ::new(key)) {
            let was_live = hist.as_slice().last().is_some_and(|v| !v.is_tombstone());
            let v = make(next(hist.as_slice(), rev));
            hist.push(v);
            self.live += usize::from(!was_live);
        }
        self.keys
            .get(KeyQ::new(key))
            .and_then(|h| h.as_slice().last())
            .expect("just put")
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
            hist: Option<&mut Hist<V>>,
            rev: Rev,
            f: impl FnOnce(Option<&Version<V>>, Rev, i64) -> (i64, V),
        ) -> (Option<Version<V>>, Version<V>) {
            let last = hist.as_ref().and_then(|h| h.as_slice().last());
            let prev = last.filter(|v| !v.is_tombstone()).copied();
            debug_assert!(last.map(|v| v.mod_rev < rev).unwrap_or(true));
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
            if let Some(h) = hist {
                h.push(v);
            }
            (prev, v)
        }
        // A key kept inline costs nothing to make: one walk down the tree
        // finds its place whether it is there or not.
        if key.len() <= KEY_INLINE_MAX {
            use std::collections::btree_map::Entry;
            return match self.keys.entry(Key::from(key)) {
                Entry::Occupied(mut o) => {
                    let out = push(Some(o.get_mut()), rev, f);
                    self.live += usize::from(out.0.is_none());
                    out
                }
                Entry::Vacant(slot) => {
                    let out = push(None, rev, f);
                    slot.insert(Hist::One(out.1));
                    self.live += 1;
                    out
                }
            };
        }
        if let Some(hist) = self.keys.get_mut(KeyQ::new(key)) {
            let out = push(Some(hist), rev, f);
            self.live += usize::from(out.0.is_none());
            return out;
        }
        // A new key: its one version stays in the tree node.
        let out = push(None, rev, f);
        self.keys.insert(key.into(), Hist::One(out.1));
        self.live += 1;
        out
    }

    /// Calls `f` for every version of every key, keys in order and each
    /// key's versions oldest first, with the version mutable (only its
    /// value's location is to change: `Shard::defrag`).
    pub fn for_each_mut<F: FnMut(&[u8], &mut Version<V>)>(&mut self, mut f: F) {
        for (k, hist) in self.keys.iter_mut() {
            for v in hist.as_mut_slice() {
                f(k.as_slice(), v);
            }
        }
    }

    /// Restores a version read back from a segment (recovery).
    pub fn restore(&mut self, key: &[u8], v: Version<V>) {
        let now_live = !v.is_tombstone();
        let was_live = match self.keys.get_mut(KeyQ::new(key)) {
            Some(h) => {
                let was = h.as_slice().last().is_some_and(|v| !v.is_tombstone());
                h.push(v);
                was
            }
            None => {
                self.keys.insert(key.into(), Hist::One(v));
                false
            }
        };
        match (was_live, now_live) {
            (false, true) => self.live += 1,
            (true, false) => self.live -= 1,
            _ => {}
        }
    }

    /// Records a delete of `key` at `rev`; false if the key was not live.
    pub fn tombstone(&mut self, key: &[u8], rev: Rev) -> bool {
        match self.keys.get_mut(KeyQ::new(key)) {
            Some(h)
                if h.as_slice()
                    .last()
                    .map(|v| !v.is_tombstone())
                    .unwrap_or(false) =>
            {
                h.push(Version {
                    mod_rev: rev,
                    create_rev: 0,
                    version: 0,
                    lease: 0,
                    value: None,
                });
                self.live -= 1;
                true
            }
            _ => false,
        }
    }

    /// Drops history at or below `rev` as etcd's compaction does.
    pub fn compact(&mut self, rev: Rev) {
        self.keys.retain(|_, hist| {
            // Position of the newest version at or below rev.
            let vs = hist.as_slice();
            let n = vs.partition_point(|v| v.mod_rev <= rev);
            if n == 0 {
                return true;
            }
            let keep_from = if vs[n - 1].is_tombstone() { n } else { n - 1 };
            hist.drop_before(keep_from)
        });
    }

    /// The version of `key` written at exactly `rev` and the live version
    /// before it (for a watch event's prev_kv), if `rev` is still in the
    /// index.
    pub fn version_at(&self, key: &[u8], rev: Rev) -> Option<(&Version<V>, Option<&Version<V>>)> {
        let hist = self.keys.get(KeyQ::new(key))?.as_slice();
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
            let hist = hist.as_slice();
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
            for v in hist.as_slice() {
                f(k.as_slice(), v);
            }
        }
    }

    /// Every version of `key`, oldest first (tests and tools).
    pub fn history(&self, key: &[u8]) -> &[Version<V>] {
        self.keys
            .get(KeyQ::new(key))
            .map(|h| h.as_slice())
            .unwrap_or(&[])
    }
}

enum Histories<'a, V> {
    One(Option<(&'a Key, &'a Hist<V>)>),
    Many(std::collections::btree_map::Range<'a, Key, Hist<V>>),
}

impl<'a, V> Iterator for Histories<'a, V> {
    type Item = (&'a [u8], &'a Hist<V>);
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Histories::One(o) => o.take().map(|(k, h)| (k.as_slice(), h)),
            Histories::Many(r) => r.next().map(|(k, h)| (k.as_slice(), h)),
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

    /// The tree's key order is `[u8]`'s: over every pair of a set of keys
    /// around the 8-byte fast path (shorter, longer, equal first 8 bytes,
    /// bytes above 0x7f, zero bytes), and a tree of them iterates sorted.
    #[test]
    fn keys_compare_as_byte_strings() {
        let mut keys: Vec<Vec<u8>> = vec![vec![]];
        for base in [
            &b"abcdefgh"[..],
            b"abcdefgi",
            b"\xffbcdefgh",
            b"abc",
            b"\0\0\0\0\0\0\0\0",
        ] {
            for extra in [&b""[..], b"\0", b"a", b"\xff", b"zz"] {
                let mut k = base.to_vec();
                k.extend_from_slice(extra);
                keys.push(k.clone());
                k.truncate(k.len().saturating_sub(1));
                keys.push(k);
            }
        }
        keys.push(vec![b'x'; 40]);
        keys.push(vec![b'x'; 41]);
        // Around the longest key kept inline (22 bytes), with and without
        // trailing zeros, which an inline key's padding also holds.
        for n in [21, 22, 23] {
            keys.push(vec![b'x'; n]);
            let mut z = vec![b'x'; n - 1];
            z.push(0);
            keys.push(z);
        }
        for a in &keys {
            for b in &keys {
                assert_eq!(cmp_keys(a, b), a.cmp(b), "{a:?} {b:?}");
                assert_eq!(KeyQ::new(a).cmp(KeyQ::new(b)), a.cmp(b));
                assert_eq!(Key::from(&a[..]).cmp(&Key::from(&b[..])), a.cmp(b));
            }
        }
        let mut ix = Ix::new();
        for (i, k) in keys.iter().enumerate() {
            ix.put(k, 2 + i as Rev, b"v".to_vec().into(), 0);
        }
        let mut want = keys.clone();
        want.sort();
        want.dedup();
        let mut got = Vec::new();
        ix.range(b"", End::Unbounded, Rev::MAX, |k, _| {
            got.push(k.to_vec());
            true
        });
        assert_eq!(got, want);
        for k in &want {
            assert!(ix.latest(k).is_some());
        }
    }

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
                assert_eq!(ix.live_keys(), st.len(), "live keys at {rev}");
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

    /// The live key count follows every way a version gets in.
    #[test]
    fn live_keys_follow_puts_deletes_restores_and_compaction() {
        let mut ix: Index<u32> = Index::new();
        let version = |rev: Rev, live: bool| Version {
            mod_rev: rev,
            create_rev: if live { rev } else { 0 },
            version: i64::from(live),
            lease: 0,
            value: live.then_some(0),
        };
        ix.put_after(b"a", 1, |_, _, _| (0, 1));
        ix.put_after(b"a", 2, |_, _, _| (0, 2));
        ix.put_after(b"b", 3, |_, _, _| (0, 3));
        assert_eq!(ix.live_keys(), 2);
        assert!(ix.tombstone(b"a", 4));
        assert!(!ix.tombstone(b"a", 5));
        assert_eq!(ix.live_keys(), 1);
        ix.put_after(b"a", 6, |_, _, _| (0, 6));
        assert_eq!(ix.live_keys(), 2);
        ix.restore(b"c", version(7, true));
        assert_eq!(ix.live_keys(), 3);
        ix.restore(b"c", version(8, false));
        assert_eq!(ix.live_keys(), 2);
        ix.put(b"d", 9, 9, 0);
        ix.put(b"d", 10, 10, 0);
        assert_eq!(ix.live_keys(), 3);
        ix.compact(10);
        assert_eq!(ix.live_keys(), 3);
        assert_eq!(ix.key_count(), 3, "c's tombstone is compacted away");
    }

    /// A key written once keeps a history of capacity 1 (not the 4 a first
    /// `push` reserves); later versions grow it as `Vec` does.
    #[test]
    fn a_single_version_stays_in_place_until_a_second_and_after_compaction() {
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
            assert!(matches!(ix.keys[KeyQ::new(key)], Hist::One(_)), "{key:?}");
        }
        ix.put(b"once", 3, val("c"), 0);
        assert_eq!(ix.history(b"once").len(), 2);
        assert!(matches!(ix.keys[KeyQ::new(b"once")], Hist::Many(_)));
        ix.compact(3);
        assert!(matches!(ix.keys[KeyQ::new(b"once")], Hist::One(_)));
        assert_eq!(ix.history(b"once")[0].mod_rev, 3);
        assert_eq!(ix.get(b"once", 3).map(|v| v.version), Some(2));
    }

    /// Keys kept in place (up to 22 bytes) and boxed ones order as their
    /// bytes do, and each is found by its bytes, around the boundary.
    #[test]
    fn keys_in_place_and_boxed_order_and_look_up_as_bytes() {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for len in [0usize, 1, 7, 8, 21, 22, 23, 24, 40] {
            for fill in [0u8, 1, 0x7f, 0xff] {
                let mut k = vec![fill; len];
                keys.push(k.clone());
                if len > 0 {
                    k[len - 1] = fill.wrapping_add(1);
                    keys.push(k);
                }
            }
        }
        keys.sort();
        keys.dedup();
        let mut ix = Ix::new();
        for (i, k) in keys.iter().enumerate() {
            ix.put(k, i as Rev + 1, val("v"), 0);
        }
        let mut seen = Vec::new();
        ix.range(b"", End::Unbounded, Rev::MAX, |k, _| {
            seen.push(k.to_vec());
            true
        });
        assert_eq!(seen, keys, "keys come back in byte order");
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(ix.get(k, Rev::MAX).map(|v| v.mod_rev), Some(i as Rev + 1));
            let key = Key::from(&k[..]);
            assert_eq!(key.as_slice(), &k[..]);
            assert_eq!(matches!(key, Key::Inline { .. }), k.len() <= KEY_INLINE_MAX);
        }
        for a in &keys {
            for b in &keys {
                assert_eq!(Key::from(&a[..]).cmp(&Key::from(&b[..])), a.cmp(b));
            }
        }
    }

    /// What the index keeps per key in its tree nodes: the key (in place
    /// up to 22 bytes) and a one-version history in place.
    #[test]
    fn key_and_history_sizes() {
        use crate::store::segment::Loc;
        assert_eq!(std::mem::size_of::<Key>(), 24);
        assert!(std::mem::size_of::<Hist<Loc>>() <= 56);
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
