//! Append-only segment files of one shard, and the reads of values out of
//! them.
//!
//! A segment file starts with an 8-byte magic and holds records:
//!
//! ```text
//! record := len:u32le | crc32c(body):u32le | body[len]
//! body   := kind:u8 | mod_rev:i64le | create_rev:i64le | version:i64le
//!           | lease:i64le | key_len:u32le | key | value
//! ```
//!
//! `kind` is 1 for a put and 2 for a tombstone (no value). Everything about
//! the byte layout lives in this module (`encode_record` / `decode_record`
//! are the build/parse pair); the rest of the store sees `Version`s and
//! `Loc`s.
//!
//! Values live here, not in memory: the index keeps, per version, a `Loc`
//! (segment id, offset and length of the value's bytes in that segment's
//! file), and `Segments::value` reads the bytes back. `Segments` owns a
//! shard's segments: appends go to a buffer of the tail segment; `flush`
//! writes the buffer with plain `write`s (into the page cache, no fsync);
//! every segment is mapped read-only (`MAP_SHARED`, which sees those
//! writes), so a read of a value is a memory access, not a syscall. Bytes
//! not flushed yet are read from the buffer. A segment rolls over when a
//! record is appended to a tail that already holds `segment_bytes_max`
//! bytes: the record starts the next segment, and the next `flush` writes
//! the full one out, fsyncs and closes it (its mapping stays). So appending
//! never does I/O, and no offset exceeds `segment_bytes_max` plus one
//! record, which keeps `Loc`'s u32 fields enough.
//!
//! *Invariant:* a mapping is never read past what has been written to its
//! file: a page past the end of a file raises SIGBUS. As with etcd's bbolt
//! mmap, an I/O error under a mapped page does the same; that is the price
//! of reads without syscalls.
//!
//! Durability: segments are written without fsync on the apply path; the WAL
//! is the durable log. A shard checkpoint fsyncs the segment and records the
//! offset up to which it is durable; recovery trusts bytes up to that offset
//! (a bad checksum there is corruption and refuses to start) and discards
//! everything after it, which the WAL replays.

use super::index::Version;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"KLSNSEG1";
pub const RECORD_HEADER_BYTES: usize = 8;
const BODY_FIXED_BYTES: usize = 1 + 8 * 4 + 4;
pub const SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// A record larger than this is corrupt (values are bounded by the request size limit).
pub const RECORD_BYTES_MAX: usize = 256 * 1024 * 1024;
/// The tail's append buffer starts this large (and keeps what a burst
/// grew it to, as the writer always has).
const TAIL_BUF_BYTES: usize = 64 * 1024;
/// The tail's mapping is made this much larger than needed, so that it is
/// remapped rarely (its length is rounded up to a multiple of this too).
const TAIL_MAP_ALIGN_BYTES: u64 = 1024 * 1024;

const KIND_PUT: u8 = 1;
const KIND_TOMBSTONE: u8 = 2;

/// Where a value's bytes are: segment `seg`, `len` bytes at file offset
/// `off`. A tombstone's location has length 0 and is never read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub seg: u32,
    pub off: u32,
    pub len: u32,
}

impl Loc {
    /// Where the value of a record written at `record_off` of segment
    /// `seg` lands, or `None` when that does not fit `Loc`'s u32 fields.
    fn of_value(seg: u64, record_off: u64, key_len: usize, value_len: usize) -> Option<Loc> {
        let off = record_off + (RECORD_HEADER_BYTES + BODY_FIXED_BYTES + key_len) as u64;
        let len = u32::try_from(value_len).ok()?;
        // The end must fit too: the next record starts there.
        u32::try_from(off + len as u64).ok()?;
        Some(Loc {
            seg: u32::try_from(seg).ok()?,
            off: u32::try_from(off).ok()?,
            len,
        })
    }

    fn end(&self) -> u64 {
        self.off as u64 + self.len as u64
    }
}

/// Bytes a record of a `key_len`-byte key and a `value_len`-byte value
/// takes in a segment.
pub fn record_bytes(key_len: usize, value_len: usize) -> usize {
    RECORD_HEADER_BYTES + BODY_FIXED_BYTES + key_len + value_len
}

pub fn encode_record<V: AsRef<[u8]>>(out: &mut Vec<u8>, key: &[u8], v: &Version<V>) {
    let value: &[u8] = v.value.as_ref().map(|b| b.as_ref()).unwrap_or(&[]);
    let len = BODY_FIXED_BYTES + key.len() + value.len();
    debug_assert!(len <= RECORD_BYTES_MAX, "record of {len} bytes");
    out.reserve(RECORD_HEADER_BYTES + len);
    let start = out.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.push(if v.is_tombstone() {
        KIND_TOMBSTONE
    } else {
        KIND_PUT
    });
    out.extend_from_slice(&v.mod_rev.to_le_bytes());
    out.extend_from_slice(&v.create_rev.to_le_bytes());
    out.extend_from_slice(&v.version.to_le_bytes());
    out.extend_from_slice(&v.lease.to_le_bytes());
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    let crc = crc32c::crc32c(&out[start + RECORD_HEADER_BYTES..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decode<'a> {
    /// A record (its key and version, both borrowed from the input) and the
    /// number of bytes it took.
    Record(&'a [u8], Version<&'a [u8]>, usize),
    /// Fewer bytes than a whole record: a torn write.
    Short,
    /// The bytes are there but do not check out.
    Corrupt(String),
}

pub fn decode_record(buf: &[u8]) -> Decode<'_> {
    if buf.len() < RECORD_HEADER_BYTES {
        return Decode::Short;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if !(BODY_FIXED_BYTES..=RECORD_BYTES_MAX).contains(&len) {
        return Decode::Corrupt(format!("record length {len} out of bounds"));
    }
    if buf.len() < RECORD_HEADER_BYTES + len {
        return Decode::Short;
    }
    let body = &buf[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len];
    if crc32c::crc32c(body) != crc {
        return Decode::Corrupt("checksum mismatch".into());
    }
    let i64_at = |o: usize| i64::from_le_bytes(body[o..o + 8].try_into().expect("8 bytes"));
    let kind = body[0];
    let key_len = u32::from_le_bytes(body[33..37].try_into().expect("4 bytes")) as usize;
    if BODY_FIXED_BYTES + key_len > len {
        return Decode::Corrupt(format!("key length {key_len} exceeds record"));
    }
    let key = &body[BODY_FIXED_BYTES..BODY_FIXED_BYTES + key_len];
    let value = &body[BODY_FIXED_BYTES + key_len..];
    let value = match kind {
        KIND_PUT => Some(value),
        KIND_TOMBSTONE if value.is_empty() => None,
        _ => return Decode::Corrupt(format!("unknown record kind {kind}")),
    };
    let v = Version {
        mod_rev: i64_at(1),
        create_rev: i64_at(9),
        version: i64_at(17),
        lease: i64_at(25),
        value,
    };
    Decode::Record(key, v, RECORD_HEADER_BYTES + len)
}

pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016}.seg"))
}

/// Segment ids present in `dir`, ascending.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for e in fs::read_dir(dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".seg") {
            if let Ok(id) = stem.parse::<u64>() {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Reads the records of segment `id` in `dir` up to `limit` bytes of file
/// (the whole file when `None`), calling `f` with each key and its version,
/// whose value is where the bytes are in the file (recovery keeps no
/// value in memory). Any record that does not check out inside the limit
/// is an error: those bytes were fsynced before a checkpoint named them,
/// so damage there is real corruption. A segment whose id or offsets do
/// not fit a `Loc` is refused too.
pub fn read_segment<F>(dir: &Path, id: u64, limit: Option<u64>, mut f: F) -> Result<u64, String>
where
    F: FnMut(&[u8], Version<Loc>),
{
    let path = segment_path(dir, id);
    if u32::try_from(id).is_err() {
        return Err(format!(
            "{}: segment id {id} is beyond what the index can address (2^32)",
            path.display()
        ));
    }
    // Mapped, not read into memory: a segment is up to 64 MiB, and only
    // the records' headers and keys are needed here.
    let io = |e: io::Error| format!("{}: {e}", path.display());
    let file = File::open(&path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let map = Map::new(&file, file_len).map_err(io)?;
    let data = map
        .slice(
            0,
            usize::try_from(file_len).map_err(|_| io(io::ErrorKind::InvalidInput.into()))?,
        )
        .expect("the mapping covers the file");
    let end = match limit {
        Some(l) if l as usize > data.len() => {
            return Err(format!(
                "{}: file is {} bytes, but the checkpoint says {l} are durable",
                path.display(),
                data.len()
            ))
        }
        Some(l) => l as usize,
        None => data.len(),
    };
    if end < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        return Err(format!(
            "{}: not a keelson segment (bad magic)",
            path.display()
        ));
    }
    let mut off = MAGIC.len();
    while off < end {
        match decode_record(&data[off..end]) {
            Decode::Record(k, v, n) => {
                let value_len = v.value.map_or(0, <[u8]>::len);
                let loc = Loc::of_value(id, off as u64, k.len(), value_len).ok_or_else(|| {
                    format!(
                        "{}: record at offset {off} is beyond what the index can address (4 GiB)",
                        path.display()
                    )
                })?;
                f(k, v.map_value(|_| loc));
                off += n;
            }
            Decode::Short => {
                return Err(format!(
                    "{}: record at offset {off} is truncated",
                    path.display()
                ))
            }
            Decode::Corrupt(why) => {
                return Err(format!("{}: record at offset {off}: {why}", path.display()))
            }
        }
    }
    Ok(off as u64)
}

/// Every segment of a shard: appends to the tail, reads of values from any.
/// See the module docs for how bytes move from the buffer to the files and
/// the mappings.
pub struct Segments {
    dir: PathBuf,
    segment_bytes_max: u64,
    /// Ascending ids; the last is the tail that appends go to. Never empty.
    segs: Vec<Segment>,
}

impl Segments {
    /// Opens the segments in `dir`: every one from `first_id` to below
    /// `tail_id` as sealed (mapped whole; recovery has read and checked
    /// them), and `tail_id` for appending at `tail_offset`, cutting
    /// anything after it (created with its magic when `tail_offset` is 0).
    /// Segments below `first_id` (retired by a defragmentation, see
    /// `Shard::defrag`) are left alone; segments above `tail_id` MUST have
    /// been removed first. `segment_bytes_max` is the roll-over size
    /// (`SEGMENT_BYTES_MAX` but in tests).
    pub fn open(
        dir: &Path,
        first_id: u64,
        tail_id: u64,
        tail_offset: u64,
        segment_bytes_max: u64,
    ) -> Result<Segments, String> {
        assert!(
            segment_bytes_max + (RECORD_BYTES_MAX as u64) < u32::MAX as u64,
            "segment_bytes_max {segment_bytes_max} leaves offsets beyond u32"
        );
        let ctx = |e: io::Error, id: u64| format!("{}: {e}", segment_path(dir, id).display());
        let id32 = |id: u64| {
            u32::try_from(id).map_err(|_| {
                format!(
                    "{}: segment id {id} is beyond what the index can address (2^32)",
                    segment_path(dir, id).display()
                )
            })
        };
        // Checked before the tail file is touched, and with room for the
        // tail to roll over once (`append` names the next segment id + 1).
        let tail32 = id32(tail_id)?;
        if tail32 == u32::MAX {
            return Err(format!(
                "{}: segment id {tail_id} leaves no id for the next segment",
                segment_path(dir, tail_id).display()
            ));
        }
        let mut segs = Vec::new();
        for id in list_segments(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            if id < first_id {
                continue;
            }
            if id >= tail_id {
                if id > tail_id {
                    return Err(format!(
                        "{}: segment after the tail {tail_id} was not removed",
                        segment_path(dir, id).display()
                    ));
                }
                continue;
            }
            let file = File::open(segment_path(dir, id)).map_err(|e| ctx(e, id))?;
            let flushed = file.metadata().map_err(|e| ctx(e, id))?.len();
            let map = Map::new(&file, flushed).map_err(|e| ctx(e, id))?;
            segs.push(Segment {
                id: id32(id)?,
                file: None,
                map,
                flushed,
                buf: Vec::new(),
                sealed: true,
            });
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(segment_path(dir, tail_id))
            .map_err(|e| ctx(e, tail_id))?;
        let flushed = if tail_offset < MAGIC.len() as u64 {
            file.set_len(0).map_err(|e| ctx(e, tail_id))?;
            file.write_all_at(MAGIC, 0).map_err(|e| ctx(e, tail_id))?;
            MAGIC.len() as u64
        } else {
            file.set_len(tail_offset).map_err(|e| ctx(e, tail_id))?;
            tail_offset
        };
        let mut tail = Segment {
            id: tail32,
            file: Some(file),
            map: Map::empty(),
            flushed,
            buf: Vec::with_capacity(TAIL_BUF_BYTES),
            sealed: false,
        };
        tail.map_tail(segment_bytes_max)
            .map_err(|e| ctx(e, tail_id))?;
        segs.push(tail);
        Ok(Segments {
            dir: dir.to_path_buf(),
            segment_bytes_max,
            segs,
        })
    }

    /// Closes and unmaps every segment, removes their files, and starts
    /// again with an empty segment 1 (a snapshot is being installed). Every
    /// `Loc` handed out before is void.
    pub fn remove_all(&mut self) -> Result<(), String> {
        let io = |e: io::Error| format!("{}: {e}", self.dir.display());
        // Unmapped before the files go.
        self.segs.clear();
        for id in list_segments(&self.dir).map_err(io)? {
            fs::remove_file(segment_path(&self.dir, id)).map_err(io)?;
        }
        *self = Segments::open(&self.dir, 0, 1, 0, self.segment_bytes_max)?;
        Ok(())
    }

    /// Starts a new tail segment (its file is created and the old tail is
    /// written out, fsynced and sealed right away) and returns its id: every
    /// record appended from now on goes to it or to later segments.
    pub fn roll(&mut self) -> io::Result<u64> {
        // Room stays for `append`'s own roll-over after this one.
        let id = match self.tail().id.checked_add(1) {
            Some(id) if id < u32::MAX => id,
            _ => return Err(io::Error::other("segment ids exhausted (2^32)")),
        };
        self.segs.push(Segment::started(id));
        self.flush()?;
        Ok(id as u64)
    }

    /// Unmaps every segment below `id` (their files stay): no `Loc` may
    /// point into them any more.
    pub fn forget_below(&mut self, id: u64) {
        self.segs.retain(|s| (s.id as u64) >= id);
        debug_assert!(!self.segs.is_empty(), "the tail stays");
    }

    /// The oldest segment in use (every one below it was forgotten, or
    /// never existed).
    pub fn first_id(&self) -> u64 {
        self.segs.first().map_or(0, |s| s.id as u64)
    }

    /// Bytes of the segments in use (every one not forgotten), written or
    /// still buffered.
    pub fn bytes(&self) -> u64 {
        self.segs.iter().map(|s| s.end()).sum()
    }

    /// Appends the record of `key` at version `v` and returns where its
    /// value's bytes are. Does no I/O: when the tail is full the record
    /// starts the next segment, whose file the next `flush` creates.
    pub fn append(&mut self, key: &[u8], v: &Version<&[u8]>) -> Loc {
        if self.tail().end() >= self.segment_bytes_max {
            // `open` leaves room for one roll; 2^32 segments of 64 MiB
            // written in one run is beyond reach.
            let id = self.tail().id.checked_add(1).expect("segment ids < 2^32");
            self.segs.push(Segment::started(id));
        }
        let tail = self.segs.last_mut().expect("a tail");
        let off = tail.end();
        encode_record(&mut tail.buf, key, v);
        let value_len = v.value.map_or(0, <[u8]>::len);
        Loc::of_value(tail.id as u64, off, key.len(), value_len)
            .expect("a record starting below segment_bytes_max fits u32 offsets")
    }

    /// The bytes of the value at `loc`: from the mapping once flushed, from
    /// the append buffer before. A location past what has been appended is
    /// a bug in the caller; it is not read (an empty slice; a panic in
    /// debug builds), so a mapping is never touched past its file's end.
    pub fn value(&self, loc: Loc) -> &[u8] {
        match self.segment(loc.seg).and_then(|s| s.bytes(loc)) {
            Some(b) => b,
            None => {
                debug_assert!(false, "value at {loc:?} is past what was written");
                &[]
            }
        }
    }

    /// Writes appended records to their files (no fsync), seals every
    /// segment that is full (fsync, close; its mapping stays) and maps
    /// what was written, which `value` then reads from the mapping.
    pub fn flush(&mut self) -> io::Result<()> {
        let last = self.segs.len() - 1;
        let first = self
            .segs
            .iter()
            .rposition(|s| s.sealed)
            .map_or(0, |i| i + 1);
        for i in first..=last {
            let seg = &mut self.segs[i];
            seg.write(&self.dir)?;
            if i < last {
                seg.seal()?;
            } else {
                seg.map_tail(self.segment_bytes_max)?;
            }
        }
        Ok(())
    }

    /// Bytes appended and not written to the files yet.
    pub fn buffered(&self) -> usize {
        self.segs
            .iter()
            .rev()
            .take_while(|s| !s.sealed)
            .map(|s| s.buf.len())
            .sum()
    }

    /// Flushes, then fsyncs the tail (sealed segments were fsynced when
    /// sealed): everything appended so far is durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.flush()?;
        self.tail().file.as_ref().expect("flushed").sync_data()
    }

    /// (tail segment id, offset after the last record appended). After a
    /// `sync`, everything up to there is durable.
    pub fn position(&self) -> (u64, u64) {
        (self.tail().id as u64, self.tail().end())
    }

    fn tail(&self) -> &Segment {
        self.segs.last().expect("a tail")
    }

    fn segment(&self, id: u32) -> Option<&Segment> {
        // Recent writes are read most: the tail first.
        match self.segs.last() {
            Some(t) if t.id == id => Some(t),
            _ => self
                .segs
                .binary_search_by_key(&id, |s| s.id)
                .ok()
                .map(|i| &self.segs[i]),
        }
    }
}

struct Segment {
    id: u32,
    /// Open while the segment can still be written; `None` before the
    /// first flush of a segment a roll-over started, and once sealed.
    file: Option<File>,
    /// Covers at least `flushed` bytes (the tail's covers more, to be
    /// remapped rarely); never read past `flushed`.
    map: Map,
    /// Bytes written to the file.
    flushed: u64,
    /// Records appended and not written yet: they go at `flushed`.
    buf: Vec<u8>,
    /// Full, fsynced and closed: never written again.
    sealed: bool,
}

impl Segment {
    /// A new segment that holds only its magic, in its buffer; `write`
    /// creates its file.
    fn started(id: u32) -> Segment {
        let mut buf = Vec::with_capacity(TAIL_BUF_BYTES);
        buf.extend_from_slice(MAGIC);
        Segment {
            id,
            file: None,
            map: Map::empty(),
            flushed: 0,
            buf,
            sealed: false,
        }
    }

    /// Offset after the last record appended.
    fn end(&self) -> u64 {
        self.flushed + self.buf.len() as u64
    }

    fn bytes(&self, loc: Loc) -> Option<&[u8]> {
        let (off, end) = (loc.off as u64, loc.end());
        if off >= self.flushed && end <= self.end() {
            let at = (off - self.flushed) as usize;
            return Some(&self.buf[at..at + loc.len as usize]);
        }
        if end <= self.flushed {
            return self.map.slice(off as usize, loc.len as usize);
        }
        None
    }

    fn write(&mut self, dir: &Path) -> io::Result<()> {
        if self.file.is_none() {
            // A segment a roll-over started (its buffer begins with the
            // magic).
            let file = OpenOptions::new()
                .create(true)
                .read(true)
                .write(true)
                .truncate(true)
                .open(segment_path(dir, self.id as u64))?;
            self.file = Some(file);
        }
        if !self.buf.is_empty() {
            let file = self.file.as_ref().expect("opened");
            file.write_all_at(&self.buf, self.flushed)?;
            self.flushed += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    fn seal(&mut self) -> io::Result<()> {
        let file = self.file.as_ref().expect("written");
        file.sync_data()?;
        if self.map.len < self.flushed {
            self.map = Map::new(file, self.flushed)?;
        }
        self.file = None;
        self.buf = Vec::new();
        self.sealed = true;
        Ok(())
    }

    /// Makes the tail's mapping cover what is flushed, with room for the
    /// segment to grow to its roll-over size and a little past it.
    fn map_tail(&mut self, segment_bytes_max: u64) -> io::Result<()> {
        if self.map.len >= self.flushed {
            return Ok(());
        }
        let want = self.flushed.max(segment_bytes_max) + segment_bytes_max / 4;
        let len = want.div_ceil(TAIL_MAP_ALIGN_BYTES) * TAIL_MAP_ALIGN_BYTES;
        self.map = Map::new(self.file.as_ref().expect("open tail"), len)?;
        Ok(())
    }
}

/// A read-only shared mapping of the first `len` bytes of a file (which
/// may be longer than the file is: those pages MUST NOT be read). Unmapped
/// when dropped.
struct Map {
    ptr: std::ptr::NonNull<u8>,
    len: u64,
}

// SAFETY: the mapping is read-only and owned by this value alone; moving it
// to another thread moves nothing that thread could race on.
unsafe impl Send for Map {}

impl Map {
    fn empty() -> Map {
        Map {
            ptr: std::ptr::NonNull::dangling(),
            len: 0,
        }
    }

    fn new(file: &File, len: u64) -> io::Result<Map> {
        if len == 0 {
            return Ok(Map::empty());
        }
        let len_usize = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: a new mapping at an address the kernel picks, of a file
        // descriptor that is open for reading; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Map {
            ptr: std::ptr::NonNull::new(p as *mut u8).expect("mmap returned null"),
            len,
        })
    }

    /// `len` bytes at `off`, if the mapping covers them. The caller MUST
    /// ask only for bytes that are in the file.
    fn slice(&self, off: usize, len: usize) -> Option<&[u8]> {
        if off as u64 + len as u64 > self.len {
            return None;
        }
        // SAFETY: inside the mapping, which lives as long as `self`, and
        // (by the caller's contract) inside the file, so no SIGBUS.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) })
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: exactly the mapping `new` made; no slice of it
            // outlives `self`.
            unsafe {
                libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len as usize);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(rev: i64, value: Option<&str>) -> Version<&[u8]> {
        Version {
            mod_rev: rev,
            create_rev: if value.is_some() { 1 } else { 0 },
            version: if value.is_some() { rev } else { 0 },
            lease: 7,
            value: value.map(str::as_bytes),
        }
    }

    #[test]
    fn round_trip() {
        for (key, ver) in [
            (&b"k"[..], v(3, Some("hello"))),
            (&b""[..], v(4, Some(""))),
            (&b"\x00\xff"[..], v(5, None)),
        ] {
            let mut buf = Vec::new();
            encode_record(&mut buf, key, &ver);
            assert_eq!(decode_record(&buf), Decode::Record(key, ver, buf.len()));
            // Every strict prefix is short, never a record or a panic.
            for cut in 0..buf.len() {
                assert_eq!(decode_record(&buf[..cut]), Decode::Short, "cut at {cut}");
            }
            // Every flipped byte is detected.
            for i in 0..buf.len() {
                let mut bad = buf.clone();
                bad[i] ^= 0x40;
                if i >= 4 {
                    assert!(
                        !matches!(decode_record(&bad), Decode::Record(..)),
                        "flip at {i} accepted"
                    );
                }
            }
        }
    }

    #[test]
    fn writer_and_reader() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Segments::open(dir.path(), 0, 1, 0, SEGMENT_BYTES_MAX).unwrap();
        for i in 1..=100 {
            w.append(format!("key{i}").as_bytes(), &v(i, Some("x")));
        }
        w.sync().unwrap();
        let (id, off) = w.position();
        assert_eq!(id, 1);
        let mut n = 0;
        let end = read_segment(dir.path(), 1, Some(off), |_, _| n += 1).unwrap();
        assert_eq!((n, end), (100, off));
        drop(w);
        // A truncated file is refused when the checkpoint covered those bytes.
        let f = OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), 1))
            .unwrap();
        f.set_len(off - 3).unwrap();
        assert!(read_segment(dir.path(), 1, Some(off), |_, _| ()).is_err());
        // Re-opening at an earlier offset cuts the tail.
        let mut w =
            Segments::open(dir.path(), 0, 1, MAGIC.len() as u64, SEGMENT_BYTES_MAX).unwrap();
        w.append(b"only", &v(1, Some("y")));
        w.flush().unwrap();
        let mut keys = Vec::new();
        read_segment(dir.path(), 1, None, |k, _| keys.push(k.to_vec())).unwrap();
        assert_eq!(keys, vec![b"only".to_vec()]);
    }

    /// The value of record `i`: lengths vary (0 included) so records
    /// straddle roll-overs and remaps at many different offsets.
    fn value_of(i: usize) -> Vec<u8> {
        (0..(i * 37) % 300).map(|j| (i + j) as u8).collect()
    }

    fn key_of(i: usize) -> Vec<u8> {
        format!("key{i:05}").into_bytes()
    }

    /// Appends `n` records (every 7th a tombstone) starting at `from`,
    /// flushing every `flush_every`, and checks every value written so far
    /// reads back, both before and after each flush.
    fn append_and_check(
        segs: &mut Segments,
        locs: &mut Vec<(usize, Option<Loc>)>,
        from: usize,
        n: usize,
        flush_every: usize,
    ) {
        for i in from..from + n {
            let value = value_of(i);
            let tomb = i % 7 == 3;
            let ver = Version {
                mod_rev: i as i64 + 1,
                create_rev: 1,
                version: 1,
                lease: 0,
                value: (!tomb).then_some(&value[..]),
            };
            let loc = segs.append(&key_of(i), &ver);
            assert_eq!(loc.len as usize, if tomb { 0 } else { value.len() });
            // Read back at once: from the append buffer.
            if !tomb {
                assert_eq!(segs.value(loc), &value[..], "record {i} before flush");
            }
            locs.push((i, (!tomb).then_some(loc)));
            if i % flush_every == 0 {
                segs.flush().unwrap();
                assert!(segs.segs.iter().all(|s| s.buf.is_empty()));
            }
        }
        for &(i, loc) in locs.iter() {
            if let Some(loc) = loc {
                assert_eq!(segs.value(loc), &value_of(i)[..], "record {i}");
            }
        }
    }

    #[test]
    fn values_read_back_across_flushes_rollovers_and_reopen() {
        // (roll-over size, flush every n records)
        let table: &[(u64, usize)] = &[
            (SEGMENT_BYTES_MAX, 1),
            (SEGMENT_BYTES_MAX, 50),
            (4096, 1),
            (4096, 13),
            (1000, 1000),
            (64, 3),
        ];
        for &(size, every) in table {
            let dir = tempfile::tempdir().unwrap();
            let mut segs = Segments::open(dir.path(), 0, 1, 0, size).unwrap();
            let mut locs = Vec::new();
            append_and_check(&mut segs, &mut locs, 0, 400, every);
            segs.flush().unwrap();
            // Every value again, now all from the mappings.
            for &(i, loc) in &locs {
                if let Some(loc) = loc {
                    assert_eq!(segs.value(loc), &value_of(i)[..], "{size}/{every}: {i}");
                }
            }
            let files = list_segments(dir.path()).unwrap();
            if size < 100_000 {
                assert!(files.len() > 2, "{size}: rolled over: {files:?}");
            }
            assert_eq!(files.last(), Some(&(segs.tail().id as u64)));
            // Sealed segments are closed; only the tail keeps a file.
            assert!(segs.segs[..segs.segs.len() - 1]
                .iter()
                .all(|s| s.sealed && s.file.is_none()));
            segs.sync().unwrap();
            let (tail, tail_off) = segs.position();
            drop(segs);

            // Recovery: the records give back the same locations, and the
            // reopened store reads the same bytes through them.
            let mut got = Vec::new();
            for id in list_segments(dir.path()).unwrap() {
                let limit = (id == tail).then_some(tail_off);
                read_segment(dir.path(), id, limit, |k, v| {
                    got.push((k.to_vec(), v.value));
                })
                .unwrap();
            }
            let want: Vec<(Vec<u8>, Option<Loc>)> =
                locs.iter().map(|&(i, loc)| (key_of(i), loc)).collect();
            assert_eq!(got, want, "{size}/{every}: recovered locations");
            let mut segs = Segments::open(dir.path(), 0, tail, tail_off, size).unwrap();
            for &(i, loc) in &locs {
                if let Some(loc) = loc {
                    assert_eq!(segs.value(loc), &value_of(i)[..], "{size}/{every}: {i}");
                }
            }
            // Appends go on after the reopened tail.
            append_and_check(&mut segs, &mut locs, 400, 100, every);
        }
    }

    /// A value written to the file after the tail was mapped is read
    /// through that mapping (MAP_SHARED sees plain writes): the store is
    /// opened with the default size, so the first mapping covers all.
    #[test]
    fn mapping_sees_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut segs = Segments::open(dir.path(), 0, 1, 0, SEGMENT_BYTES_MAX).unwrap();
        let before = segs.tail().map.len;
        let loc = segs.append(b"k", &v(1, Some("written after mmap")));
        segs.flush().unwrap();
        assert_eq!(segs.tail().map.len, before, "not remapped");
        assert!(segs.tail().buf.is_empty());
        assert_eq!(segs.value(loc), b"written after mmap");
    }

    /// A location past what was written is never read from the mapping
    /// (the tail's mapping reaches far past the file's end, where a read
    /// would kill the process with SIGBUS): release builds answer empty,
    /// debug builds panic.
    #[test]
    fn location_past_written_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut segs = Segments::open(dir.path(), 0, 1, 0, SEGMENT_BYTES_MAX).unwrap();
        let loc = segs.append(b"k", &v(1, Some("abc")));
        segs.flush().unwrap();
        assert!(segs.tail().map.len > 1 << 20);
        let bad = [
            Loc {
                off: loc.off + 4096 * 3,
                ..loc
            },
            Loc { len: 5000, ..loc },
            Loc { seg: 2, ..loc },
            Loc { seg: 0, ..loc },
        ];
        for b in bad {
            // Every byte is summed, so that a slice of the mapping past
            // the file's end would be touched (SIGBUS), not only measured.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let bytes = std::hint::black_box(segs.value(b));
                (bytes.len(), bytes.iter().map(|&x| x as u64).sum::<u64>())
            }));
            match r {
                Ok(got) => assert_eq!(got, (0, 0), "{b:?}"),
                // Debug builds panic on purpose; release builds must not.
                Err(_) if cfg!(debug_assertions) => {}
                Err(e) => std::panic::resume_unwind(e),
            }
        }
        assert_eq!(segs.value(loc), b"abc");
    }

    #[test]
    fn locations_beyond_u32_are_refused() {
        // (segment, record offset, key length, value length, fits)
        let table: &[(u64, u64, usize, usize, bool)] = &[
            (1, 8, 3, 256, true),
            (u32::MAX as u64, 8, 3, 256, true),
            (u32::MAX as u64 + 1, 8, 3, 256, false),
            (1, u32::MAX as u64 - 300, 3, 200, true),
            (1, u32::MAX as u64 - 300, 3, 300, false),
            (1, u32::MAX as u64, 0, 0, false),
        ];
        for &(seg, off, key_len, value_len, fits) in table {
            let loc = Loc::of_value(seg, off, key_len, value_len);
            assert_eq!(loc.is_some(), fits, "{seg} {off} {key_len} {value_len}");
        }
        // At recovery: a segment whose id does not fit is an error.
        let dir = tempfile::tempdir().unwrap();
        let big = u32::MAX as u64 + 1;
        fs::write(segment_path(dir.path(), big), MAGIC).unwrap();
        assert!(read_segment(dir.path(), big, None, |_, _| ()).is_err());
        assert!(Segments::open(dir.path(), 0, big, MAGIC.len() as u64, SEGMENT_BYTES_MAX).is_err());
        // Nor may the tail be the last id (it could not roll over), and the
        // refusal leaves its file as it was.
        let last = u32::MAX as u64;
        fs::write(segment_path(dir.path(), last), b"not touched").unwrap();
        assert!(Segments::open(dir.path(), 0, last, 4, SEGMENT_BYTES_MAX).is_err());
        assert_eq!(
            fs::read(segment_path(dir.path(), last)).unwrap(),
            b"not touched"
        );
        // A tail one below the last id opens, and a defragmentation's roll
        // is refused (an error, not a panic) so that appending can still
        // roll over once.
        let dir = tempfile::tempdir().unwrap();
        let mut segs = Segments::open(dir.path(), 0, last - 1, 0, SEGMENT_BYTES_MAX).unwrap();
        assert!(segs.roll().is_err());
        assert_eq!(segs.position().0, last - 1);
    }
}
