//! The write-ahead log of Raft entries and hard state.
//!
//! `data-dir/wal/` holds segment files named `{seq:016}.wal`, each starting
//! with an 8-byte magic and a `Base` record (index and term of the entry just
//! before the segment's first), then records:
//!
//! ```text
//! record := len:u32le | crc32c(body):u32le | body[len]
//! body   := type:u8 | payload
//! type 1 = Entry (eraftpb::Entry, protobuf), 2 = HardState (protobuf),
//! type 3 = Base (index:u64le, term:u64le)
//! ```
//!
//! An Entry whose index is at or below the last one read replaces the tail
//! from that index (Raft overwrote it). Writes go through io_uring with
//! `O_DIRECT` (glommio's `DmaFile`; on a filesystem without direct I/O,
//! such as tmpfs, glommio opens it buffered), one aligned write per batch
//! with `RWF_DSYNC` (glommio's `write_at_dsync`, keelson's patch): the
//! write completes once the batch is durable, as a write followed by an
//! fdatasync would, in one request — that is the group commit. No
//! io_uring worker thread runs an `FSYNC` and no second request waits for
//! the write's completion: where the drive has a volatile cache and no
//! FUA (these VMs), the kernel's direct-I/O completion worker, which
//! finishes every direct write anyway, issues the flush. A batch rarely
//! ends on a block boundary, so the writer keeps the last partial block
//! (`tail`) and writes it again, with the new records after it, at the
//! start of the next batch's write; bytes after the last record in that
//! block are zeros. No page cache copy and no writeback on the sync path:
//! the sync only flushes the drive's cache.
//!
//! Segment files are zero-filled ahead of the write position in
//! `PREALLOC_BYTES` steps, as part of a batch's write: most batches then
//! overwrite already-allocated blocks, so their sync flushes data only
//! and not the inode (about 5% less server CPU per put measured here).
//! All-zero bytes after the last record are the clean end of a segment.
//!
//! Recovery (`read_all`) cuts a torn or corrupt tail of the last segment with
//! a log line; damage followed by intact data, or in an older segment, is
//! refused with a clear error, because it would drop acknowledged writes.

use protobuf::Message;
use raft::eraftpb::{Entry, HardState};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"KLSNWAL1";
pub const SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;
const HEADER_BYTES: usize = 8;
/// How far ahead of the write position a segment is zero-filled.
pub const PREALLOC_BYTES: u64 = 1024 * 1024;
const RECORD_BYTES_MAX: usize = 512 * 1024 * 1024;

const T_ENTRY: u8 = 1;
const T_HARDSTATE: u8 = 2;
const T_BASE: u8 = 3;

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// (index, term) just before the first entry kept.
    pub base: (u64, u64),
    pub hard_state: HardState,
    pub entries: Vec<Entry>,
    /// Next segment sequence number and the byte offset to append at.
    pub tail: Option<(u64, u64)>,
    /// Segments present, oldest first, with their base index.
    pub segments: Vec<(u64, u64)>,
}

/// Where a data dir keeps its WAL unless `--wal-dir` says otherwise.
pub fn wal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("wal")
}

/// A new WAL whose log starts after `base` (index, term), with `hs` as
/// its hard state: what `keelson snapshot restore` leaves, so the first
/// entry written after it is `base.0 + 1`. Synchronous (no executor).
pub fn create_at_base(dir: &Path, base: (u64, u64), hs: &HardState) -> Result<(), String> {
    use std::io::Write;
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = MAGIC.to_vec();
    let mut payload = base.0.to_le_bytes().to_vec();
    payload.extend_from_slice(&base.1.to_le_bytes());
    encode_record(&mut out, T_BASE, &payload);
    let bytes = hs.write_to_bytes().map_err(|e| e.to_string())?;
    encode_record(&mut out, T_HARDSTATE, &bytes);
    let path = seg_path(&dir, 1);
    let mut f = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(&out)
        .and_then(|_| f.sync_all())
        .and_then(|_| File::open(&dir)?.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn seg_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016}.wal"))
}

fn list(dir: &Path) -> Result<Vec<u64>, String> {
    let mut v = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    for e in rd {
        let name = e.map_err(|e| e.to_string())?.file_name();
        let name = name.to_string_lossy();
        if let Some(seq) = name
            .strip_suffix(".wal")
            .and_then(|s| s.parse::<u64>().ok())
        {
            v.push(seq);
        }
    }
    v.sort_unstable();
    Ok(v)
}

pub fn encode_record(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let len = 1 + payload.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let body_at = out.len();
    out.push(kind);
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[body_at..]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Appends an entry's record: its protobuf encoding (what
/// `Entry::write_to_bytes` gives: fields in number order, defaults left
/// out) written straight into `out`, with no buffer of its own.
pub fn encode_entry_record(out: &mut Vec<u8>, e: &Entry) {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let len_at = out.len();
    out.extend_from_slice(&[0; 8]);
    let body_at = out.len();
    out.push(T_ENTRY);
    let kind = e.get_entry_type() as u64;
    if kind != 0 {
        out.push(1 << 3);
        varint(out, kind);
    }
    if e.term != 0 {
        out.push(2 << 3);
        varint(out, e.term);
    }
    if e.index != 0 {
        out.push(3 << 3);
        varint(out, e.index);
    }
    if !e.data.is_empty() {
        out.push(4 << 3 | 2);
        varint(out, e.data.len() as u64);
        out.extend_from_slice(&e.data);
    }
    if e.sync_log {
        out.push(5 << 3);
        out.push(1);
    }
    if !e.context.is_empty() {
        out.push(6 << 3 | 2);
        varint(out, e.context.len() as u64);
        out.extend_from_slice(&e.context);
    }
    let len = (out.len() - body_at) as u32;
    let crc = crc32c::crc32c(&out[body_at..]);
    out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
    out[len_at + 4..len_at + 8].copy_from_slice(&crc.to_le_bytes());
}

enum Rec<'a> {
    Ok(u8, &'a [u8], usize),
    Short,
    Bad(String),
}

fn decode(buf: &[u8]) -> Rec<'_> {
    if buf.len() < HEADER_BYTES {
        return Rec::Short;
    }
    let len = u32::from_le_bytes(buf[0..4].try_into().expect("4")) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4"));
    if len == 0 || len > RECORD_BYTES_MAX {
        return Rec::Bad(format!("record length {len} out of bounds"));
    }
    if buf.len() < HEADER_BYTES + len {
        return Rec::Short;
    }
    let body = &buf[HEADER_BYTES..HEADER_BYTES + len];
    if crc32c::crc32c(body) != crc {
        return Rec::Bad("checksum mismatch".into());
    }
    Rec::Ok(body[0], &body[1..], HEADER_BYTES + len)
}

/// Reads every segment. See the module doc for what is cut and what refused.
pub fn read_all(dir: &Path) -> Result<Recovered, String> {
    let seqs = list(dir)?;
    let mut rec = Recovered::default();
    let mut last_index = 0u64;
    for (i, &seq) in seqs.iter().enumerate() {
        let last_seg = i + 1 == seqs.len();
        let path = seg_path(&dir, seq);
        let mut data = Vec::new();
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut data))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
            if last_seg && data.iter().all(|b| *b == 0) {
                // Created but never written: a crash right after creation.
                crate::warn!("wal: {} is empty, removing it", path.display());
                fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                continue;
            }
            return Err(format!(
                "{}: not a keelson WAL segment (bad magic)",
                path.display()
            ));
        }
        let mut off = MAGIC.len();
        let mut seg_base = None;
        loop {
            if off >= data.len() || data[off..].iter().all(|b| *b == 0) {
                // The end, or the zero-filled space ahead of it.
                data.truncate(off);
                break;
            }
            let problem = match decode(&data[off..]) {
                Rec::Ok(kind, payload, n) => {
                    match kind {
                        T_BASE if payload.len() == 16 => {
                            let idx = u64::from_le_bytes(payload[0..8].try_into().expect("8"));
                            let term = u64::from_le_bytes(payload[8..16].try_into().expect("8"));
                            seg_base = Some(idx);
                            if rec.entries.is_empty() && last_index == 0 {
                                rec.base = (idx, term);
                                last_index = idx;
                            }
                        }
                        T_ENTRY => {
                            let e = Entry::parse_from_bytes(payload).map_err(|e| {
                                format!("{}: entry at offset {off}: {e}", path.display())
                            })?;
                            if e.index <= rec.base.0 {
                                return Err(format!(
                                    "{}: entry {} at offset {off} is below the log's base {}",
                                    path.display(),
                                    e.index,
                                    rec.base.0
                                ));
                            }
                            if e.index > last_index + 1 {
                                return Err(format!(
                                    "{}: entry {} at offset {off} leaves a gap after {last_index}",
                                    path.display(),
                                    e.index
                                ));
                            }
                            let keep = (e.index - rec.base.0 - 1) as usize;
                            rec.entries.truncate(keep);
                            last_index = e.index;
                            rec.entries.push(e);
                        }
                        T_HARDSTATE => {
                            rec.hard_state = HardState::parse_from_bytes(payload).map_err(|e| {
                                format!("{}: hard state at offset {off}: {e}", path.display())
                            })?;
                        }
                        other => {
                            return Err(format!(
                                "{}: unknown record type {other} at offset {off}",
                                path.display()
                            ))
                        }
                    }
                    off += n;
                    continue;
                }
                Rec::Short => "a truncated record".to_string(),
                Rec::Bad(why) => why,
            };
            // A damaged record. Only the tail of the last segment may be cut:
            // data there was never acknowledged (a write is acknowledged only
            // after its batch's fdatasync, and batches are appended in order).
            let rest_is_blank = !has_valid_record_after(&data, off);
            if !last_seg || !rest_is_blank {
                return Err(format!(
                    "{}: corrupt record at offset {off} ({problem}) followed by intact data; refusing to start (this would lose acknowledged writes)",
                    path.display()
                ));
            }
            crate::warn!(
                "wal: {}: cutting a torn tail at offset {off} ({problem}, {} bytes dropped)",
                path.display(),
                data.len() - off
            );
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            f.set_len(off as u64)
                .and_then(|_| f.sync_all())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            data.truncate(off);
            break;
        }
        rec.segments.push((seq, seg_base.unwrap_or(0)));
        if last_seg {
            rec.tail = Some((seq, data.len() as u64));
        }
    }
    Ok(rec)
}

/// Whether any intact record starts after the damaged one at `off`.
fn has_valid_record_after(data: &[u8], off: usize) -> bool {
    (off + 1..data.len().saturating_sub(HEADER_BYTES))
        .any(|o| matches!(decode(&data[o..]), Rec::Ok(k, _, _) if (1..=3).contains(&k)))
}

/// Appends batches to the tail segment. Lives on the raft core.
pub struct Wal {
    dir: PathBuf,
    seq: u64,
    file: glommio::io::DmaFile,
    /// End of the last record written.
    pos: u64,
    /// (seq, base index) of every segment, oldest first.
    segments: Vec<(u64, u64)>,
    buf: Vec<u8>,
    /// Bytes of the file that exist (records, then zeros).
    filled: u64,
    /// The file's bytes from `pos` rounded down to `align` up to `pos`:
    /// rewritten in front of the next batch, since direct I/O writes whole
    /// blocks.
    tail: Vec<u8>,
    align: u64,
    /// `--unsafe-no-fsync`: batches are written but not fdatasynced.
    no_fsync: bool,
}

/// Direct I/O writes at least whole filesystem blocks (ext4's are 4 KiB,
/// even on drives that take 512-byte writes).
const ALIGN_MIN: u64 = 4096;

impl Wal {
    /// Opens the WAL after `read_all`, appending to its tail or creating the
    /// first segment.
    pub async fn open(dir: &Path, rec: &Recovered, last: (u64, u64)) -> Result<Wal, String> {
        let dir = dir.to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        match rec.tail {
            Some((seq, pos)) => {
                let path = seg_path(&dir, seq);
                let file = glommio::io::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .dma_open(&path)
                    .await
                    .map_err(|e| format!("wal open: {e}"))?;
                let align = file.alignment().max(ALIGN_MIN);
                let filled = fs::metadata(&path).map(|m| m.len()).unwrap_or(pos).max(pos);
                // The partial block before `pos`, read back (recovery has
                // checked these bytes; the rest of the block is rewritten as
                // zeros by the next batch, which is the clean end anyway).
                let start = pos / align * align;
                let mut tail = vec![0u8; (pos - start) as usize];
                {
                    use std::os::unix::fs::FileExt;
                    File::open(&path)
                        .and_then(|f| f.read_exact_at(&mut tail, start))
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
                Ok(Wal {
                    dir,
                    seq,
                    file,
                    pos,
                    segments: rec.segments.clone(),
                    buf: Vec::new(),
                    filled,
                    tail,
                    align,
                    no_fsync: false,
                })
            }
            None => Wal::create(dir, 1, last, Vec::new()).await,
        }
    }

    async fn create(
        dir: PathBuf,
        seq: u64,
        base: (u64, u64),
        mut segments: Vec<(u64, u64)>,
    ) -> Result<Wal, String> {
        let path = seg_path(&dir, seq);
        let file = glommio::io::DmaFile::create(&path)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let align = file.alignment().max(ALIGN_MIN);
        let mut head = MAGIC.to_vec();
        let mut payload = base.0.to_le_bytes().to_vec();
        payload.extend_from_slice(&base.1.to_le_bytes());
        encode_record(&mut head, T_BASE, &payload);
        segments.push((seq, base.0));
        let mut wal = Wal {
            dir,
            seq,
            file,
            pos: 0,
            segments,
            buf: Vec::new(),
            filled: 0,
            tail: Vec::new(),
            align,
            no_fsync: false,
        };
        wal.write(&head, true)
            .await
            .map_err(|e| format!("{}: {e}", path.display()))?;
        File::open(&wal.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("{}: {e}", wal.dir.display()))?;
        Ok(wal)
    }

    /// Writes `data` at `pos`, durably when `sync`: one aligned
    /// direct write of the partial block kept in `tail`, then `data`, then
    /// zeros up to the next block boundary, or up to the next
    /// `PREALLOC_BYTES` boundary when the write reaches past what the file
    /// has. With `sync`, the write carries `RWF_DSYNC`: durable when it
    /// completes.
    async fn write(&mut self, data: &[u8], sync: bool) -> Result<(), String> {
        let align = self.align;
        let start = self.pos - self.tail.len() as u64;
        let end = self.pos + data.len() as u64;
        let mut to = end.div_ceil(align) * align;
        if to > self.filled {
            to = (end + PREALLOC_BYTES) / PREALLOC_BYTES * PREALLOC_BYTES;
        }
        let len = (to - start) as usize;
        let mut dma = self.file.alloc_dma_buffer(len);
        let b = dma.as_bytes_mut();
        let t = self.tail.len();
        b[..t].copy_from_slice(&self.tail);
        b[t..t + data.len()].copy_from_slice(data);
        b[t + data.len()..].fill(0);
        // The new partial block, kept before the buffer goes to the kernel.
        let tail_from = (end / align * align - start) as usize;
        let new_tail = b[tail_from..t + data.len()].to_vec();
        let written = if sync {
            let t = std::time::Instant::now();
            let n = self
                .file
                .write_at_dsync(dma, start)
                .await
                .map_err(|e| format!("wal write (RWF_DSYNC): {e}"))?;
            let secs = t.elapsed().as_secs_f64();
            crate::metrics::count(|c| c.wal_fsync.observe(secs));
            n
        } else {
            self.file
                .write_at(dma, start)
                .await
                .map_err(|e| format!("wal write: {e}"))?
        };
        if written != len {
            return Err(format!("wal write: short write {written} of {len}"));
        }
        self.filled = self.filled.max(to);
        self.pos = end;
        self.tail = new_tail;
        Ok(())
    }

    pub fn push_entries(&mut self, entries: &[Entry]) {
        for e in entries {
            encode_entry_record(&mut self.buf, e);
        }
    }

    pub fn push_hard_state(&mut self, hs: &HardState) {
        let bytes = hs.write_to_bytes().expect("hard state encodes");
        encode_record(&mut self.buf, T_HARDSTATE, &bytes);
    }

    pub fn has_pending(&self) -> bool {
        !self.buf.is_empty()
    }

    /// etcd's `--unsafe-no-fsync`: from now on batches are written (direct
    /// I/O, so they reach the drive) but not flushed from its cache; a
    /// power loss may lose acknowledged writes.
    pub fn set_unsafe_no_fsync(&mut self, on: bool) {
        self.no_fsync = on;
    }

    /// Writes what was pushed, durably: one batch, one sync.
    /// `last` is (index, term) of the last entry in the log afterwards,
    /// used as the base of the next segment when this one is full.
    pub async fn sync(&mut self, last: (u64, u64), hs: &HardState) -> Result<(), String> {
        if self.buf.is_empty() {
            return Ok(());
        }
        // Taken for the write and given back empty, so the next batch
        // reuses its capacity.
        let mut buf = std::mem::take(&mut self.buf);
        self.write(&buf, !self.no_fsync).await?;
        buf.clear();
        self.buf = buf;
        if self.pos >= SEGMENT_BYTES_MAX {
            let segments = std::mem::take(&mut self.segments);
            let mut next = Wal::create(self.dir.clone(), self.seq + 1, last, segments).await?;
            next.no_fsync = self.no_fsync;
            let old = std::mem::replace(self, next);
            // The new segment must carry the hard state too, or dropping the
            // old one later would lose it.
            self.push_hard_state(hs);
            let _ = old.file.close().await;
        }
        Ok(())
    }

    /// After installing a snapshot at `base` (its shards are durable
    /// there): the log starts again after it, in a new segment, and every
    /// older segment goes. Records pushed and not yet synced carry over.
    pub async fn install_snapshot(&mut self, base: (u64, u64)) -> Result<(), String> {
        let old = std::mem::take(&mut self.segments);
        let mut next = Wal::create(self.dir.clone(), self.seq + 1, base, Vec::new()).await?;
        next.buf = std::mem::take(&mut self.buf);
        next.no_fsync = self.no_fsync;
        let prev = std::mem::replace(self, next);
        let _ = prev.file.close().await;
        for (seq, _) in old {
            let path = seg_path(&self.dir, seq);
            if let Err(e) = fs::remove_file(&path) {
                crate::warn!("wal: could not remove {}: {e}", path.display());
            }
        }
        Ok(())
    }

    /// Deletes segments whose entries all lie at or below `index` (every
    /// shard has checkpointed past them). The tail segment always stays.
    pub fn release_to(&mut self, index: u64) -> usize {
        let mut removed = 0;
        while self.segments.len() >= 2 && self.segments[1].1 <= index {
            let (seq, _) = self.segments.remove(0);
            let path = seg_path(&self.dir, seq);
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) => {
                    crate::warn!("wal: could not remove {}: {e}", path.display());
                    break;
                }
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::EntryType;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = data.to_vec().into();
        e
    }

    /// The direct-I/O writer: batches of every size (inside one block,
    /// across blocks, across the zero-filled stretch), a reopen in the
    /// middle of a partial block, and a segment roll all read back whole.
    #[test]
    fn writer_batches_and_reopen_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().to_path_buf();
        let sizes: Vec<usize> = vec![1, 7, 300, 4000, 5000, 100, 70_000, 3, 1_100_000, 9];
        let hs = HardState::default();
        let mut expect = Vec::new();
        let d = data_dir.clone();
        let sz = sizes.clone();
        let written = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let rec = read_all(&d).unwrap();
                let mut wal = Wal::open(&d, &rec, (0, 0)).await.unwrap();
                let mut idx = 0u64;
                let mut out = Vec::new();
                for (round, n) in sz.iter().enumerate() {
                    let batch: Vec<Entry> = (0..1 + round % 3)
                        .map(|k| {
                            idx += 1;
                            entry(idx, 1, &vec![(idx as u8) ^ (k as u8); *n])
                        })
                        .collect();
                    wal.push_entries(&batch);
                    wal.sync((idx, 1), &hs).await.unwrap();
                    out.extend(batch);
                }
                out
            })
            .unwrap()
            .join()
            .unwrap();
        expect.extend(written);
        // Reopen mid-block and append more.
        let d = data_dir.clone();
        let more = glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let rec = read_all(&d).unwrap();
                let last = rec.entries.last().map(|e| (e.index, e.term)).unwrap();
                let mut wal = Wal::open(&d, &rec, last).await.unwrap();
                let batch: Vec<Entry> = (1..=3).map(|k| entry(last.0 + k, 2, b"after")).collect();
                wal.push_entries(&batch);
                wal.sync((last.0 + 3, 2), &HardState::default())
                    .await
                    .unwrap();
                batch
            })
            .unwrap()
            .join()
            .unwrap();
        expect.extend(more);
        let rec = read_all(&data_dir).unwrap();
        assert_eq!(rec.entries.len(), expect.len());
        for (a, b) in rec.entries.iter().zip(&expect) {
            assert_eq!((a.index, a.term, &a.data), (b.index, b.term, &b.data));
        }
    }

    /// The `RWF_DSYNC` write (third_party/glommio/PATCHES.md): what it
    /// writes reads back; a write that fails (a file opened only for
    /// reading) reports the write's error and the executor goes on.
    #[test]
    fn dsync_writes_write_and_fail_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let p = path.clone();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let f = glommio::io::DmaFile::create(&p).await.unwrap();
                let align = f.alignment() as usize;
                for round in 0..3u8 {
                    let mut buf = f.alloc_dma_buffer(2 * align);
                    buf.as_bytes_mut().fill(round + 1);
                    let n = f
                        .write_at_dsync(buf, round as u64 * 2 * align as u64)
                        .await
                        .unwrap();
                    assert_eq!(n, 2 * align);
                }
                f.close().await.unwrap();
                let ro = glommio::io::DmaFile::open(&p).await.unwrap();
                let buf = ro.alloc_dma_buffer(align);
                let err = ro.write_at_dsync(buf, 0).await.unwrap_err();
                assert!(err.to_string().contains("Writing"), "{err}");
                let back = ro.read_at(0, 6 * align).await.unwrap();
                for (i, b) in back.iter().enumerate() {
                    assert_eq!(*b, (i / (2 * align)) as u8 + 1, "byte {i}");
                }
                ro.close().await.unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
    }

    /// The block device's count of completed flushes (`/sys/dev/block/
    /// M:m/stat`, field 16), where the file at `path` lives, if that
    /// device has a volatile write cache and no FUA: then every durable
    /// write to it must flush. `None` elsewhere (tmpfs, a device that
    /// needs no flush, an older kernel).
    fn flushes_of(path: &Path) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let dev = fs::metadata(path).ok()?.dev();
        let (major, minor) = (libc::major(dev), libc::minor(dev));
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let queue = [sys.join("queue"), sys.join("../queue")]
            .into_iter()
            .find(|q| q.is_dir())?;
        let read = |f: &str| fs::read_to_string(queue.join(f)).ok();
        if read("write_cache")?.trim() != "write back" || read("fua")?.trim() != "0" {
            return None;
        }
        let stat = fs::read_to_string(sys.join("stat")).ok()?;
        stat.split_whitespace().nth(15)?.parse().ok()
    }

    /// Each `RWF_DSYNC` write flushes the drive's cache, as a write and an
    /// fdatasync would: without the flag no flush would be counted.
    #[test]
    fn dsync_writes_flush_the_drive() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![0u8; 1 << 16]).unwrap();
        let Some(before) = flushes_of(&p) else {
            eprintln!("skipped: no flush count for {}", p.display());
            return;
        };
        const WRITES: u64 = 16;
        let q = p.clone();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let f = glommio::io::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .dma_open(&q)
                    .await
                    .unwrap();
                let align = f.alignment() as usize;
                for round in 0..WRITES {
                    let mut buf = f.alloc_dma_buffer(align);
                    buf.as_bytes_mut().fill(round as u8);
                    f.write_at_dsync(buf, 0).await.unwrap();
                }
                f.close().await.unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
        let after = flushes_of(&p).unwrap();
        assert!(
            after - before >= WRITES,
            "{WRITES} durable writes, {} flushes",
            after - before
        );
    }

    fn write_segment(dir: &Path, seq: u64, base: (u64, u64), recs: &[(u8, Vec<u8>)]) -> PathBuf {
        fs::create_dir_all(dir).unwrap();
        let mut buf = MAGIC.to_vec();
        let mut p = base.0.to_le_bytes().to_vec();
        p.extend_from_slice(&base.1.to_le_bytes());
        encode_record(&mut buf, T_BASE, &p);
        for (k, payload) in recs {
            encode_record(&mut buf, *k, payload);
        }
        let path = seg_path(dir, seq);
        fs::write(&path, buf).unwrap();
        path
    }

    fn e(index: u64, term: u64) -> (u8, Vec<u8>) {
        (T_ENTRY, entry(index, term, b"x").write_to_bytes().unwrap())
    }

    #[test]
    fn overwrite_and_base() {
        let d = tempfile::tempdir().unwrap();
        write_segment(d.path(), 1, (0, 0), &[e(1, 1), e(2, 1), e(3, 1), e(2, 2)]);
        write_segment(d.path(), 2, (2, 2), &[e(3, 2)]);
        let r = read_all(d.path()).unwrap();
        let got: Vec<(u64, u64)> = r.entries.iter().map(|e| (e.index, e.term)).collect();
        assert_eq!(got, vec![(1, 1), (2, 2), (3, 2)]);
        assert_eq!(r.segments, vec![(1, 0), (2, 2)]);
    }

    #[test]
    fn torn_tail_is_cut_every_length() {
        let d = tempfile::tempdir().unwrap();
        let path = write_segment(d.path(), 1, (0, 0), &[e(1, 1), e(2, 1), e(3, 1)]);
        let full = fs::read(&path).unwrap();
        let two = {
            let mut b = MAGIC.to_vec();
            let mut p = 0u64.to_le_bytes().to_vec();
            p.extend_from_slice(&0u64.to_le_bytes());
            encode_record(&mut b, T_BASE, &p);
            encode_record(&mut b, T_ENTRY, &e(1, 1).1);
            encode_record(&mut b, T_ENTRY, &e(2, 1).1);
            b.len()
        };
        for cut in two..full.len() {
            fs::write(&path, &full[..cut]).unwrap();
            let r = read_all(d.path()).unwrap();
            let want = if cut == full.len() { 3 } else { 2 };
            assert_eq!(r.entries.len(), want, "cut at {cut}");
            assert_eq!(
                fs::metadata(&path).unwrap().len() as usize,
                two,
                "file cut back at {cut}"
            );
        }
    }

    #[test]
    fn corruption_before_intact_data_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = write_segment(d.path(), 1, (0, 0), &[e(1, 1), e(2, 1), e(3, 1)]);
        let mut data = fs::read(&path).unwrap();
        let at = MAGIC.len() + 30; // inside the first entry record
        data[at] ^= 0xff;
        fs::write(&path, &data).unwrap();
        let err = read_all(d.path()).unwrap_err();
        assert!(err.contains("refusing to start"), "{err}");
    }

    #[test]
    fn damage_in_older_segment_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p1 = write_segment(d.path(), 1, (0, 0), &[e(1, 1), e(2, 1)]);
        write_segment(d.path(), 2, (2, 1), &[e(3, 1)]);
        let mut data = fs::read(&p1).unwrap();
        let n = data.len();
        data.truncate(n - 3);
        fs::write(&p1, &data).unwrap();
        assert!(read_all(d.path()).is_err());
    }

    #[test]
    fn zero_filled_space_is_the_clean_end() {
        let d = tempfile::tempdir().unwrap();
        let path = write_segment(d.path(), 1, (0, 0), &[e(1, 1), e(2, 1)]);
        let records = fs::metadata(&path).unwrap().len();
        let mut data = fs::read(&path).unwrap();
        data.resize(data.len() + 100_000, 0);
        fs::write(&path, &data).unwrap();
        let r = read_all(d.path()).unwrap();
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.tail, Some((1, records)));
        // Nothing is cut: the zeros stay allocated for the writer.
        assert_eq!(fs::metadata(&path).unwrap().len(), records + 100_000);

        // A torn record over the zeros is cut, the entries before stay.
        data[records as usize..records as usize + 6].copy_from_slice(&[9, 0, 0, 0, 1, 2]);
        fs::write(&path, &data).unwrap();
        let r = read_all(d.path()).unwrap();
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.tail, Some((1, records)));
    }

    /// An entry's record written field by field is the record of its
    /// protobuf encoding, for entries with and without each field.
    #[test]
    fn entry_records_match_the_protobuf_encoding() {
        let mut cases = Vec::new();
        for (kind, term, index, data, ctx) in [
            (EntryType::EntryNormal, 0u64, 0u64, &b""[..], &b""[..]),
            (EntryType::EntryNormal, 3, 7, b"put", b"0123456789abcdef"),
            (
                EntryType::EntryConfChange,
                1 << 40,
                u64::MAX,
                &[0xffu8; 300][..],
                b"",
            ),
            (EntryType::EntryConfChangeV2, 2, 200, b"", b"c"),
        ] {
            let mut e = Entry::default();
            e.set_entry_type(kind);
            e.term = term;
            e.index = index;
            e.data = data.to_vec().into();
            e.context = ctx.to_vec().into();
            cases.push(e);
        }
        let mut e = Entry::default();
        e.sync_log = true;
        e.index = 9;
        cases.push(e);
        for e in cases {
            let mut want = Vec::new();
            encode_record(&mut want, T_ENTRY, &e.write_to_bytes().unwrap());
            let mut got = Vec::new();
            encode_entry_record(&mut got, &e);
            assert_eq!(got, want, "{e:?}");
        }
    }
}
