//! A writer and a reader of bbolt database files, the file format etcd
//! keeps its backend in and streams as its snapshot. keelson's
//! `Maintenance.Snapshot` sends such a file (laid out with etcd 3.4's
//! buckets by `etcd_db`), so `etcdctl snapshot status|restore` accept it.
//!
//! This module knows the bytes only (pages, elements, meta, buckets); it
//! knows nothing of etcd's buckets or keelson's versions.
//!
//! The layout written, as bbolt lays out a freshly compacted file:
//!
//! - page 0 and page 1: the two meta pages (magic `0xED0CDAED`, version 2,
//!   page size, flags, root bucket, freelist page, high-water page id,
//!   txid, and the FNV-1a 64 of those fields), identical but for the txid
//!   (even on page 0, odd on page 1, as bbolt's `txid % 2` places them);
//! - page 2: the freelist, empty;
//! - from page 3: the buckets' pages, children before their parents.
//!   A bucket with no sub-bucket whose one leaf takes at most a quarter of
//!   a page is written inline in its parent's value (as bbolt does); any
//!   other bucket gets leaf pages packed in key order, and branch pages
//!   over them, level by level, until one page is the bucket's root. An
//!   element larger than a page gets a page of its own with `overflow`
//!   more pages after it.
//!
//! *Invariants* (what bbolt's `tx.Check()`, which `etcdctl snapshot
//! status` runs, verifies): every page below the high-water mark is
//! reachable exactly once (meta, freelist, or one bucket's tree) and none
//! is free; every page's header carries its own id; the file holds every
//! page below the high-water mark. The reader never panics on input: every
//! offset is checked against the page and the file, every page is visited
//! at most once, and nesting is bounded.

use std::borrow::Cow;
use std::collections::HashSet;

/// The page size written (the usual one; the reader takes any power of
/// two from 512 to 64 KiB from the meta page).
pub const PAGE_SIZE: usize = 4096;
/// bbolt's limits on a key and a value.
pub const KEY_BYTES_MAX: usize = 32768;
pub const VALUE_BYTES_MAX: usize = (1 << 31) - 2;

const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const PAGE_HEADER: usize = 16;
const ELEMENT: usize = 16;
const BUCKET_HEADER: usize = 16;
/// Where the checksum sits in the meta (the bytes before it are summed).
const META_SUMMED: usize = 56;
const FLAG_BRANCH: u16 = 0x01;
const FLAG_LEAF: u16 = 0x02;
const FLAG_META: u16 = 0x04;
const FLAG_FREELIST: u16 = 0x10;
/// A leaf element whose value is a bucket.
const ELEMENT_BUCKET: u32 = 0x01;
/// bbolt inlines a bucket whose leaf takes at most this (page size / 4).
const INLINE_BYTES_MAX: usize = PAGE_SIZE / 4;
/// Buckets within buckets, and branch levels within a bucket, beyond this
/// are refused by the reader (and the writer): a real file nests a few.
const DEPTH_MAX: usize = 64;
/// The txid of meta page 0 (page 1 has the next one).
const TXID: u64 = 2;
const NO_FREELIST: u64 = u64::MAX;

/// A bucket: its keys in order, each with a value or a nested bucket.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bucket {
    pub items: Vec<(Vec<u8>, Item)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Value(Vec<u8>),
    Bucket(Bucket),
}

impl Bucket {
    pub fn new() -> Bucket {
        Bucket::default()
    }

    /// Adds a value (the writer sorts keys; a key given twice is an error
    /// there).
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.items.push((key.into(), Item::Value(value.into())));
    }

    pub fn put_bucket(&mut self, key: impl Into<Vec<u8>>, b: Bucket) {
        self.items.push((key.into(), Item::Bucket(b)));
    }

    /// The nested bucket named `name`, if there is one.
    pub fn bucket(&self, name: &[u8]) -> Option<&Bucket> {
        self.items.iter().find_map(|(k, i)| match i {
            Item::Bucket(b) if k == name => Some(b),
            _ => None,
        })
    }

    /// The value under `key` (not a bucket), if there is one.
    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.items.iter().find_map(|(k, i)| match i {
            Item::Value(v) if k == key => Some(v.as_slice()),
            _ => None,
        })
    }

    /// The values (not the buckets), in the order held.
    pub fn values(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.items.iter().filter_map(|(k, i)| match i {
            Item::Value(v) => Some((k.as_slice(), v.as_slice())),
            Item::Bucket(_) => None,
        })
    }
}

// ------------------------------------------------------------------ writer

/// Writes `root`'s buckets as a bbolt file. Every item of `root` must be a
/// bucket (bbolt's root holds only buckets).
pub fn write(root: &Bucket) -> Result<Vec<u8>, String> {
    if root.items.iter().any(|(_, i)| matches!(i, Item::Value(_))) {
        return Err("bbolt: the root bucket holds only buckets".into());
    }
    let mut w = Writer {
        out: vec![0; 3 * PAGE_SIZE],
    };
    // The root is never written inline (`root` is true).
    let Written::Root(root_pgid) = w.bucket(root, 0, true)? else {
        return Err("bbolt: the root bucket came out inline".into());
    };
    let high_water = w.next_pgid();
    // The freelist: an empty page.
    put_header(&mut w.out[2 * PAGE_SIZE..], 2, FLAG_FREELIST, 0, 0);
    for (page, txid) in [(0u64, TXID), (1, TXID + 1)] {
        let p = &mut w.out[page as usize * PAGE_SIZE..(page as usize + 1) * PAGE_SIZE];
        put_header(p, page, FLAG_META, 0, 0);
        let m = Meta {
            page_size: PAGE_SIZE as u32,
            flags: 0,
            root: root_pgid,
            sequence: 0,
            freelist: 2,
            high_water,
            txid,
        };
        p[PAGE_HEADER..PAGE_HEADER + 64].copy_from_slice(&m.encode());
    }
    Ok(w.out)
}

struct Writer {
    out: Vec<u8>,
}

/// What a written bucket leaves for its parent's element.
enum Written {
    Root(u64),
    Inline(Vec<u8>),
}

impl Written {
    fn value(self) -> Vec<u8> {
        match self {
            Written::Inline(v) => v,
            Written::Root(id) => {
                let mut v = id.to_le_bytes().to_vec();
                v.extend_from_slice(&0u64.to_le_bytes()); // sequence
                v
            }
        }
    }
}

/// One element as it goes into a leaf page.
struct LeafElem<'a> {
    key: &'a [u8],
    flags: u32,
    value: Cow<'a, [u8]>,
}

impl LeafElem<'_> {
    fn bytes(&self) -> usize {
        ELEMENT + self.key.len() + self.value.len()
    }
}

impl Writer {
    fn next_pgid(&self) -> u64 {
        (self.out.len() / PAGE_SIZE) as u64
    }

    /// Appends a page (with overflow pages) of `bytes` bytes; returns its
    /// id and where it starts in `out`.
    fn alloc(&mut self, bytes: usize) -> (u64, usize) {
        let pages = bytes.div_ceil(PAGE_SIZE).max(1);
        let id = self.next_pgid();
        let at = self.out.len();
        self.out.resize(at + pages * PAGE_SIZE, 0);
        (id, at)
    }

    fn bucket(&mut self, b: &Bucket, depth: usize, root: bool) -> Result<Written, String> {
        if depth > DEPTH_MAX {
            return Err("bbolt: buckets nested too deep".into());
        }
        let mut order: Vec<&(Vec<u8>, Item)> = b.items.iter().collect();
        order.sort_by(|a, b| a.0.cmp(&b.0));
        let mut elems = Vec::with_capacity(order.len());
        let mut has_child = false;
        for (i, (k, item)) in order.iter().enumerate() {
            if i > 0 && order[i - 1].0 == *k {
                return Err(format!("bbolt: key {k:?} given twice"));
            }
            if k.is_empty() || k.len() > KEY_BYTES_MAX {
                return Err(format!("bbolt: key of {} bytes", k.len()));
            }
            let (flags, value) = match item {
                Item::Value(v) if v.len() > VALUE_BYTES_MAX => {
                    return Err(format!("bbolt: value of {} bytes", v.len()))
                }
                Item::Value(v) => (0, Cow::Borrowed(v.as_slice())),
                Item::Bucket(child) => {
                    has_child = true;
                    let w = self.bucket(child, depth + 1, false)?;
                    (ELEMENT_BUCKET, Cow::Owned(w.value()))
                }
            };
            elems.push(LeafElem {
                key: k,
                flags,
                value,
            });
        }
        let leaf_bytes = PAGE_HEADER + elems.iter().map(|e| e.bytes()).sum::<usize>();
        if !root && !has_child && leaf_bytes <= INLINE_BYTES_MAX {
            let mut v = vec![0u8; BUCKET_HEADER + leaf_bytes];
            write_leaf(&mut v[BUCKET_HEADER..], 0, &elems);
            return Ok(Written::Inline(v));
        }
        // Leaf pages, packed in key order.
        let mut level: Vec<(Vec<u8>, u64)> = Vec::new();
        for group in pack(&elems, |e| e.bytes()) {
            let bytes = PAGE_HEADER + group.iter().map(|e| e.bytes()).sum::<usize>();
            let (id, at) = self.alloc(bytes);
            write_leaf(&mut self.out[at..], id, group);
            level.push((
                group.first().map(|e| e.key.to_vec()).unwrap_or_default(),
                id,
            ));
        }
        // Branch pages over them until one page is left: the root.
        let mut levels = 0;
        while level.len() > 1 {
            levels += 1;
            if levels > DEPTH_MAX {
                return Err("bbolt: too many branch levels".into());
            }
            let mut up = Vec::new();
            for group in pack(&level, |(k, _)| ELEMENT + k.len()) {
                let bytes =
                    PAGE_HEADER + group.iter().map(|(k, _)| ELEMENT + k.len()).sum::<usize>();
                let (id, at) = self.alloc(bytes);
                write_branch(&mut self.out[at..], id, group);
                up.push((group[0].0.clone(), id));
            }
            level = up;
        }
        Ok(Written::Root(level[0].1))
    }
}

/// Splits `items` into runs that each fit a page (an item larger than a
/// page alone), never leaving a run of one item after a full one when two
/// fit together: the runs are as bbolt's splits make them, within a page.
fn pack<T>(items: &[T], bytes: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut used = PAGE_HEADER;
    for (i, it) in items.iter().enumerate() {
        let n = bytes(it);
        if i > start && used + n > PAGE_SIZE {
            runs.push(&items[start..i]);
            start = i;
            used = PAGE_HEADER;
        }
        used += n;
    }
    runs.push(&items[start..]);
    runs
}

fn put_header(p: &mut [u8], id: u64, flags: u16, count: u16, overflow: u32) {
    p[0..8].copy_from_slice(&id.to_le_bytes());
    p[8..10].copy_from_slice(&flags.to_le_bytes());
    p[10..12].copy_from_slice(&count.to_le_bytes());
    p[12..16].copy_from_slice(&overflow.to_le_bytes());
}

fn overflow_of(bytes: usize) -> u32 {
    (bytes.div_ceil(PAGE_SIZE).max(1) - 1) as u32
}

/// Writes a leaf page at the start of `p` (id 0 for an inline bucket's).
fn write_leaf(p: &mut [u8], id: u64, elems: &[LeafElem]) {
    let bytes = PAGE_HEADER + elems.iter().map(|e| e.bytes()).sum::<usize>();
    let overflow = if id == 0 { 0 } else { overflow_of(bytes) };
    // At most (page - header) / element elements fit a page, or one.
    put_header(p, id, FLAG_LEAF, elems.len() as u16, overflow);
    let mut data = PAGE_HEADER + ELEMENT * elems.len();
    for (i, e) in elems.iter().enumerate() {
        let at = PAGE_HEADER + ELEMENT * i;
        p[at..at + 4].copy_from_slice(&e.flags.to_le_bytes());
        p[at + 4..at + 8].copy_from_slice(&((data - at) as u32).to_le_bytes());
        p[at + 8..at + 12].copy_from_slice(&(e.key.len() as u32).to_le_bytes());
        p[at + 12..at + 16].copy_from_slice(&(e.value.len() as u32).to_le_bytes());
        p[data..data + e.key.len()].copy_from_slice(e.key);
        data += e.key.len();
        p[data..data + e.value.len()].copy_from_slice(&e.value);
        data += e.value.len();
    }
}

fn write_branch(p: &mut [u8], id: u64, children: &[(Vec<u8>, u64)]) {
    let bytes = PAGE_HEADER
        + children
            .iter()
            .map(|(k, _)| ELEMENT + k.len())
            .sum::<usize>();
    put_header(
        p,
        id,
        FLAG_BRANCH,
        children.len() as u16,
        overflow_of(bytes),
    );
    let mut data = PAGE_HEADER + ELEMENT * children.len();
    for (i, (k, child)) in children.iter().enumerate() {
        let at = PAGE_HEADER + ELEMENT * i;
        p[at..at + 4].copy_from_slice(&((data - at) as u32).to_le_bytes());
        p[at + 4..at + 8].copy_from_slice(&(k.len() as u32).to_le_bytes());
        p[at + 8..at + 16].copy_from_slice(&child.to_le_bytes());
        p[data..data + k.len()].copy_from_slice(k);
        data += k.len();
    }
}

// -------------------------------------------------------------------- meta

/// The meta page's fields after the magic and version.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Meta {
    page_size: u32,
    flags: u32,
    root: u64,
    sequence: u64,
    freelist: u64,
    high_water: u64,
    txid: u64,
}

impl Meta {
    fn encode(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&VERSION.to_le_bytes());
        b[8..12].copy_from_slice(&self.page_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.root.to_le_bytes());
        b[24..32].copy_from_slice(&self.sequence.to_le_bytes());
        b[32..40].copy_from_slice(&self.freelist.to_le_bytes());
        b[40..48].copy_from_slice(&self.high_water.to_le_bytes());
        b[48..56].copy_from_slice(&self.txid.to_le_bytes());
        let sum = fnv1a64(&b[..META_SUMMED]);
        b[56..64].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// The meta at the start of a meta page's body, if it is one bbolt
    /// would accept (magic, version, checksum; bbolt also accepts a zero
    /// checksum).
    fn decode(b: &[u8]) -> Result<Meta, String> {
        let b = b.get(..64).ok_or("meta page cut short")?;
        if le32(b, 0) != MAGIC {
            return Err("invalid database (bad magic)".into());
        }
        if le32(b, 4) != VERSION {
            return Err(format!("version {} (want {VERSION})", le32(b, 4)));
        }
        let sum = le64(b, 56);
        if sum != 0 && sum != fnv1a64(&b[..META_SUMMED]) {
            return Err("meta checksum mismatch".into());
        }
        Ok(Meta {
            page_size: le32(b, 8),
            flags: le32(b, 12),
            root: le64(b, 16),
            sequence: le64(b, 24),
            freelist: le64(b, 32),
            high_water: le64(b, 40),
            txid: le64(b, 48),
        })
    }
}

/// FNV-1a, 64 bits: bbolt's meta checksum.
fn fnv1a64(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

// ------------------------------------------------------------------ reader

/// What `read` found besides the buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    pub page_size: u32,
    pub txid: u64,
    /// Pages below the high-water mark (the file's used size in pages).
    pub pages: u64,
}

/// Reads a bbolt file (bytes after the last page, such as the sha256 an
/// etcd snapshot file ends with, are ignored) into its root bucket.
pub fn read(file: &[u8]) -> Result<(Bucket, Info), String> {
    let m0 = file
        .get(PAGE_HEADER..)
        .ok_or_else(|| "invalid database (too small)".to_string())
        .and_then(Meta::decode);
    // Page 1 is one page size further; take it from a valid page 0.
    let ps = match &m0 {
        Ok(m) => m.page_size as usize,
        Err(_) => PAGE_SIZE,
    };
    let m1 = file
        .get(ps + PAGE_HEADER..)
        .ok_or_else(|| "invalid database (too small)".to_string())
        .and_then(Meta::decode);
    let meta = match (m0, m1) {
        (Ok(a), Ok(b)) => {
            if b.txid > a.txid {
                b
            } else {
                a
            }
        }
        (Ok(a), Err(_)) => a,
        (Err(_), Ok(b)) => b,
        (Err(e), Err(_)) => return Err(format!("bbolt: {e}")),
    };
    let ps = meta.page_size as usize;
    if !(512..=65536).contains(&ps) || !ps.is_power_of_two() {
        return Err(format!("bbolt: page size {ps}"));
    }
    let r = Reader {
        file,
        ps,
        high_water: meta.high_water,
        seen: HashSet::new(),
    };
    if (meta.high_water as u128) * (ps as u128) > file.len() as u128 {
        return Err(format!(
            "bbolt: truncated ({} bytes, {} pages of {ps} expected)",
            file.len(),
            meta.high_water
        ));
    }
    if meta.freelist != NO_FREELIST {
        let p = r.page(meta.freelist)?;
        if le16(p, 8) & FLAG_FREELIST == 0 {
            return Err(format!("bbolt: page {} is not a freelist", meta.freelist));
        }
    }
    let mut r = r;
    let root = r.bucket_at(meta.root, 0)?;
    Ok((
        root,
        Info {
            page_size: meta.page_size,
            txid: meta.txid,
            pages: meta.high_water,
        },
    ))
}

struct Reader<'a> {
    file: &'a [u8],
    ps: usize,
    high_water: u64,
    /// Pages read so far: a page reached twice is corruption (and would
    /// otherwise let a loop of pages run forever).
    seen: HashSet<u64>,
}

impl<'a> Reader<'a> {
    /// Page `id` with its overflow pages, checked against the file and the
    /// high-water mark.
    fn page(&self, id: u64) -> Result<&'a [u8], String> {
        if id < 2 || id >= self.high_water {
            return Err(format!(
                "bbolt: page {id} out of bounds (high water {})",
                self.high_water
            ));
        }
        let at = (id as usize)
            .checked_mul(self.ps)
            .filter(|&a| a + PAGE_HEADER <= self.file.len())
            .ok_or_else(|| format!("bbolt: page {id} beyond the file"))?;
        let head = &self.file[at..at + PAGE_HEADER];
        if le64(head, 0) != id {
            return Err(format!(
                "bbolt: page {id} says it is page {}",
                le64(head, 0)
            ));
        }
        let pages = le32(head, 12) as u64 + 1;
        if id + pages > self.high_water {
            return Err(format!("bbolt: page {id} overflows the high water mark"));
        }
        let end = at + pages as usize * self.ps;
        self.file
            .get(at..end)
            .ok_or_else(|| format!("bbolt: page {id} beyond the file"))
    }

    fn bucket_at(&mut self, root: u64, depth: usize) -> Result<Bucket, String> {
        let mut b = Bucket::new();
        self.tree(root, depth, 0, &mut b)?;
        Ok(b)
    }

    /// Reads the page tree under `id` into `out`, in key order.
    fn tree(
        &mut self,
        id: u64,
        depth: usize,
        level: usize,
        out: &mut Bucket,
    ) -> Result<(), String> {
        if level > DEPTH_MAX {
            return Err("bbolt: too many branch levels".into());
        }
        if !self.seen.insert(id) {
            return Err(format!("bbolt: page {id} is reached twice"));
        }
        let p = self.page(id)?;
        let flags = le16(p, 8);
        if flags & FLAG_BRANCH != 0 {
            let count = le16(p, 10) as usize;
            if count == 0 {
                return Err(format!("bbolt: branch page {id} is empty"));
            }
            for i in 0..count {
                let at = PAGE_HEADER + ELEMENT * i;
                let e = p
                    .get(at..at + ELEMENT)
                    .ok_or_else(|| format!("bbolt: page {id}: elements beyond the page"))?;
                let (pos, ksize) = (le32(e, 0) as usize, le32(e, 4) as usize);
                span(p, at, pos, ksize)
                    .ok_or_else(|| format!("bbolt: page {id}: key beyond the page"))?;
                self.tree(le64(e, 8), depth, level + 1, out)?;
            }
            Ok(())
        } else if flags & FLAG_LEAF != 0 {
            self.leaf(p, id, depth, out)
        } else {
            Err(format!(
                "bbolt: page {id} is neither branch nor leaf (flags {flags:#x})"
            ))
        }
    }

    /// The elements of a leaf page (`p` starts at its header; an inline
    /// bucket's page is the rest of its value).
    fn leaf(&mut self, p: &[u8], id: u64, depth: usize, out: &mut Bucket) -> Result<(), String> {
        if p.len() < PAGE_HEADER || le16(p, 8) & FLAG_LEAF == 0 {
            return Err(format!("bbolt: page {id} is not a leaf"));
        }
        let count = le16(p, 10) as usize;
        for i in 0..count {
            let at = PAGE_HEADER + ELEMENT * i;
            let e = p
                .get(at..at + ELEMENT)
                .ok_or_else(|| format!("bbolt: page {id}: elements beyond the page"))?;
            let (flags, pos) = (le32(e, 0), le32(e, 4) as usize);
            let (ksize, vsize) = (le32(e, 8) as usize, le32(e, 12) as usize);
            let kv = span(p, at, pos, ksize + vsize)
                .ok_or_else(|| format!("bbolt: page {id}: element {i} beyond the page"))?;
            let (k, v) = kv.split_at(ksize);
            if let Some((last, _)) = out.items.last() {
                if last.as_slice() >= k {
                    return Err(format!("bbolt: page {id}: keys out of order"));
                }
            }
            let item = if flags & ELEMENT_BUCKET != 0 {
                if depth >= DEPTH_MAX {
                    return Err("bbolt: buckets nested too deep".into());
                }
                if v.len() < BUCKET_HEADER {
                    return Err(format!("bbolt: page {id}: bucket {k:?} without a header"));
                }
                let root = le64(v, 0);
                if root == 0 {
                    let mut b = Bucket::new();
                    self.leaf(&v[BUCKET_HEADER..], id, depth + 1, &mut b)?;
                    Item::Bucket(b)
                } else {
                    Item::Bucket(self.bucket_at(root, depth + 1)?)
                }
            } else {
                Item::Value(v.to_vec())
            };
            out.items.push((k.to_vec(), item));
        }
        Ok(())
    }
}

/// `len` bytes at `pos` past the element at `at`, if they lie within `p`.
fn span(p: &[u8], at: usize, pos: usize, len: usize) -> Option<&[u8]> {
    let start = at.checked_add(pos)?;
    p.get(start..start.checked_add(len)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the file as bbolt's `tx.Check()` does: every page below the
    /// high-water mark reachable exactly once, each with its own id.
    fn check(file: &[u8]) {
        assert_eq!(file.len() % PAGE_SIZE, 0);
        let hw = le64(file, PAGE_HEADER + 40);
        assert_eq!(hw as usize * PAGE_SIZE, file.len());
        let mut reached = vec![0u32; hw as usize];
        reached[0] += 1;
        reached[1] += 1;
        reached[2] += 1;
        fn walk(file: &[u8], id: u64, reached: &mut [u32]) {
            let p = &file[id as usize * PAGE_SIZE..];
            assert_eq!(le64(p, 0), id);
            for i in 0..=le32(p, 12) as u64 {
                reached[(id + i) as usize] += 1;
            }
            let flags = le16(p, 8);
            for i in 0..le16(p, 10) as usize {
                let at = PAGE_HEADER + ELEMENT * i;
                if flags & FLAG_BRANCH != 0 {
                    walk(file, le64(p, at + 8), reached);
                } else if le32(p, at) & ELEMENT_BUCKET != 0 {
                    let pos = at + le32(p, at + 4) as usize + le32(p, at + 8) as usize;
                    let root = le64(p, pos);
                    if root != 0 {
                        walk(file, root, reached);
                    }
                }
            }
        }
        let root = le64(file, PAGE_HEADER + 16);
        walk(file, root, &mut reached);
        assert!(reached.iter().all(|&n| n == 1), "{reached:?}");
    }

    fn sorted(mut b: Bucket) -> Bucket {
        b.items.sort_by(|x, y| x.0.cmp(&y.0));
        for (_, i) in &mut b.items {
            if let Item::Bucket(c) = i {
                *c = sorted(std::mem::take(c));
            }
        }
        b
    }

    fn round_trip(root: Bucket) -> Vec<u8> {
        let file = write(&root).unwrap();
        check(&file);
        let (back, info) = read(&file).unwrap();
        assert_eq!(back, sorted(root));
        assert_eq!(info.page_size as usize, PAGE_SIZE);
        assert_eq!(info.pages as usize * PAGE_SIZE, file.len());
        file
    }

    #[test]
    fn fnv_is_fnv1a_64() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn small_buckets_round_trip_inline() {
        let mut a = Bucket::new();
        a.put("z", "last");
        a.put("a", "first");
        let mut root = Bucket::new();
        root.put_bucket("alpha", a);
        root.put_bucket("empty", Bucket::new());
        let file = round_trip(root);
        // Meta, meta, freelist and the root's one leaf: both buckets inline.
        assert_eq!(file.len(), 4 * PAGE_SIZE);
        assert_eq!(le64(&file, PAGE_HEADER + 48) % 2, 0);
        assert_eq!(le64(&file, PAGE_SIZE + PAGE_HEADER + 48) % 2, 1);
    }

    #[test]
    fn an_empty_root_round_trips() {
        let file = round_trip(Bucket::new());
        assert_eq!(file.len(), 4 * PAGE_SIZE);
    }

    #[test]
    fn many_keys_make_branch_levels() {
        let mut big = Bucket::new();
        for i in 0..100_000u32 {
            big.put(format!("key-{i:08}"), i.to_be_bytes().to_vec());
        }
        let mut root = Bucket::new();
        root.put_bucket("big", big);
        let file = round_trip(root);
        // Leaves of 127 keys, branches of 145: the bucket's root is a
        // branch over branches (three levels).
        let root_leaf = &file[le64(&file, PAGE_HEADER + 16) as usize * PAGE_SIZE..];
        let e = PAGE_HEADER + le32(root_leaf, PAGE_HEADER + 4) as usize + 3;
        let big_root = le64(root_leaf, e) as usize;
        let p = &file[big_root * PAGE_SIZE..];
        assert_eq!(le16(p, 8), FLAG_BRANCH);
        let child = le64(p, PAGE_HEADER + 8) as usize;
        assert_eq!(le16(&file[child * PAGE_SIZE..], 8), FLAG_BRANCH);
    }

    #[test]
    fn big_values_take_overflow_pages() {
        let mut b = Bucket::new();
        b.put("a", vec![1u8; 10]);
        b.put("big", vec![7u8; 3 * PAGE_SIZE + 5]);
        b.put("c", vec![2u8; PAGE_SIZE - 40]);
        b.put("d", vec![3u8; 100]);
        let mut nested = Bucket::new();
        nested.put("n", vec![9u8; 2000]);
        let mut inner = Bucket::new();
        inner.put("deep", "x");
        nested.put_bucket("inner", inner);
        b.put_bucket("nested", nested);
        let mut root = Bucket::new();
        root.put_bucket("b", b);
        round_trip(root);
    }

    #[test]
    fn bad_input_to_the_writer_is_refused() {
        let mut root = Bucket::new();
        root.put("not-a-bucket", "x");
        assert!(write(&root).is_err());
        let mut b = Bucket::new();
        b.put("k", "1");
        b.put("k", "2");
        let mut root = Bucket::new();
        root.put_bucket("b", b);
        assert!(write(&root).unwrap_err().contains("twice"));
        let mut b = Bucket::new();
        b.put("", "1");
        let mut root = Bucket::new();
        root.put_bucket("b", b);
        assert!(write(&root).is_err());
    }

    #[test]
    fn corrupt_or_cut_files_are_errors_not_panics() {
        let mut b = Bucket::new();
        for i in 0..2000u32 {
            b.put(format!("k{i:05}"), vec![i as u8; (i % 97) as usize]);
        }
        b.put("huge", vec![5u8; 9000]);
        let mut root = Bucket::new();
        root.put_bucket("b", b);
        root.put_bucket("e", Bucket::new());
        let file = write(&root).unwrap();
        // Cuts: at most page-granular ones fail, none panics.
        for n in (0..file.len()).step_by(509) {
            assert!(read(&file[..n]).is_err(), "cut at {n}");
        }
        // Flipped bytes anywhere: an error or a (different) read, never a
        // panic; in a meta page the other meta page takes over.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut bad = file.clone();
            let at = (x % bad.len() as u64) as usize;
            bad[at] ^= 1 << (x >> 60 & 7);
            let _ = read(&bad);
        }
        // Both meta pages damaged: invalid.
        let mut bad = file.clone();
        bad[PAGE_HEADER] ^= 1;
        bad[PAGE_SIZE + PAGE_HEADER + 20] ^= 1;
        let e = read(&bad).unwrap_err();
        assert!(
            e.contains("invalid database") || e.contains("checksum"),
            "{e}"
        );
        // One damaged: the other is used.
        let mut one = file.clone();
        one[PAGE_HEADER + 20] ^= 1;
        assert_eq!(read(&one).unwrap().0, sorted(root.clone()));
        let (back, _) = read(&file).unwrap();
        assert_eq!(back.bucket(b"b").unwrap().items.len(), 2001);
        assert!(read(&[]).is_err());
        assert!(read(&vec![0u8; 3 * PAGE_SIZE]).is_err());
    }

    #[test]
    fn a_loop_of_pages_is_refused() {
        let mut b = Bucket::new();
        for i in 0..1000u32 {
            b.put(format!("k{i:05}"), vec![0u8; 50]);
        }
        let mut root = Bucket::new();
        root.put_bucket("b", b);
        let mut file = write(&root).unwrap();
        // Find the branch page and point its first child at itself.
        let hw = le64(&file, PAGE_HEADER + 40);
        let branch = (3..hw)
            .find(|&id| le16(&file[id as usize * PAGE_SIZE..], 8) & FLAG_BRANCH != 0)
            .unwrap();
        let at = branch as usize * PAGE_SIZE + PAGE_HEADER + 8;
        file[at..at + 8].copy_from_slice(&branch.to_le_bytes());
        assert!(read(&file).unwrap_err().contains("twice"));
    }
}
