//! Append-only segment files of one shard.
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
//! are the build/parse pair); the rest of the store only sees `Version`s.
//!
//! Durability: segments are written without fsync on the apply path; the WAL
//! is the durable log. A shard checkpoint fsyncs the segment and records the
//! offset up to which it is durable; recovery trusts bytes up to that offset
//! (a bad checksum there is corruption and refuses to start) and discards
//! everything after it, which the WAL replays.

use super::index::Version;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"KLSNSEG1";
pub const RECORD_HEADER_BYTES: usize = 8;
const BODY_FIXED_BYTES: usize = 1 + 8 * 4 + 4;
pub const SEGMENT_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// A record larger than this is corrupt (values are bounded by the request size limit).
pub const RECORD_BYTES_MAX: usize = 256 * 1024 * 1024;

const KIND_PUT: u8 = 1;
const KIND_TOMBSTONE: u8 = 2;

pub fn encode_record(out: &mut Vec<u8>, key: &[u8], v: &Version) {
    let value: &[u8] = v.value.as_deref().unwrap_or(&[]);
    let len = BODY_FIXED_BYTES + key.len() + value.len();
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
pub enum Decode {
    /// A record and the number of bytes it took.
    Record(Vec<u8>, Version, usize),
    /// Fewer bytes than a whole record: a torn write.
    Short,
    /// The bytes are there but do not check out.
    Corrupt(String),
}

pub fn decode_record(buf: &[u8]) -> Decode {
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
    let key = body[BODY_FIXED_BYTES..BODY_FIXED_BYTES + key_len].to_vec();
    let value = &body[BODY_FIXED_BYTES + key_len..];
    let value = match kind {
        KIND_PUT => Some(Box::<[u8]>::from(value)),
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

/// Reads the records of a segment up to `limit` bytes of file (the whole
/// file when `None`), calling `f` for each. Any record that does not check
/// out inside the limit is an error: those bytes were fsynced before a
/// checkpoint named them, so damage there is real corruption.
pub fn read_segment<F>(path: &Path, limit: Option<u64>, mut f: F) -> Result<u64, String>
where
    F: FnMut(Vec<u8>, Version),
{
    let mut data = Vec::new();
    File::open(path)
        .and_then(|mut fh| fh.read_to_end(&mut data))
        .map_err(|e| format!("{}: {e}", path.display()))?;
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
                f(k, v);
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

/// The open tail segment of a shard, written with plain buffered appends.
pub struct SegmentWriter {
    dir: PathBuf,
    id: u64,
    file: File,
    /// Bytes in the file (including what `buf` will add once flushed).
    written: u64,
    buf: Vec<u8>,
}

impl SegmentWriter {
    /// Opens segment `id` for appending at `offset` (cutting anything after
    /// it), or creates it when `offset` is 0.
    pub fn open(dir: &Path, id: u64, offset: u64) -> io::Result<SegmentWriter> {
        let path = segment_path(dir, id);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)?;
        let written = if offset < MAGIC.len() as u64 {
            file.set_len(0)?;
            file.write_all(MAGIC)?;
            MAGIC.len() as u64
        } else {
            file.set_len(offset)?;
            offset
        };
        use std::io::Seek;
        file.seek(io::SeekFrom::Start(written))?;
        Ok(SegmentWriter {
            dir: dir.to_path_buf(),
            id,
            file,
            written,
            buf: Vec::with_capacity(64 * 1024),
        })
    }

    pub fn append(&mut self, key: &[u8], v: &Version) {
        let before = self.buf.len();
        encode_record(&mut self.buf, key, v);
        self.written += (self.buf.len() - before) as u64;
    }

    /// Writes buffered records to the file (no fsync) and rolls over to a
    /// new segment when this one is full.
    pub fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_all(&self.buf)?;
            self.buf.clear();
        }
        if self.written >= SEGMENT_BYTES_MAX {
            self.file.sync_data()?;
            let next = SegmentWriter::open(&self.dir, self.id + 1, 0)?;
            *self = next;
        }
        Ok(())
    }

    /// (segment id, durable-after-sync offset, a handle to fsync).
    pub fn position(&self) -> (u64, u64) {
        (self.id, self.written)
    }

    pub fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(rev: i64, value: Option<&str>) -> Version {
        Version {
            mod_rev: rev,
            create_rev: if value.is_some() { 1 } else { 0 },
            version: if value.is_some() { rev } else { 0 },
            lease: 7,
            value: value.map(|s| s.as_bytes().into()),
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
            assert_eq!(
                decode_record(&buf),
                Decode::Record(key.to_vec(), ver, buf.len())
            );
            // Every strict prefix is short, never a record or a panic.
            for cut in 0..buf.len() {
                assert_eq!(decode_record(&buf[..cut]), Decode::Short, "cut at {cut}");
            }
            // Every flipped byte is detected.
            for i in 0..buf.len() {
                let mut bad = buf.clone();
                bad[i] ^= 0x40;
                assert!(
                    !matches!(decode_record(&bad), Decode::Record(_, _, n) if n == buf.len() && bad == buf),
                    "flip at {i}"
                );
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
        let mut w = SegmentWriter::open(dir.path(), 1, 0).unwrap();
        for i in 1..=100 {
            w.append(format!("key{i}").as_bytes(), &v(i, Some("x")));
        }
        w.flush().unwrap();
        let (id, off) = w.position();
        assert_eq!(id, 1);
        let mut n = 0;
        let end = read_segment(&segment_path(dir.path(), 1), Some(off), |_, _| n += 1).unwrap();
        assert_eq!((n, end), (100, off));
        // A truncated file is refused when the checkpoint covered those bytes.
        let f = OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), 1))
            .unwrap();
        f.set_len(off - 3).unwrap();
        assert!(read_segment(&segment_path(dir.path(), 1), Some(off), |_, _| ()).is_err());
        // Re-opening at an earlier offset cuts the tail.
        let mut w = SegmentWriter::open(dir.path(), 1, MAGIC.len() as u64).unwrap();
        w.append(b"only", &v(1, Some("y")));
        w.flush().unwrap();
        let mut keys = Vec::new();
        read_segment(&segment_path(dir.path(), 1), None, |k, _| keys.push(k)).unwrap();
        assert_eq!(keys, vec![b"only".to_vec()]);
    }
}
