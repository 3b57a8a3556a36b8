//! Criterion benches for the segment format: encoding a record, appending
//! records through `Segments` (buffered, flushed every 64 records as the
//! shard does per apply batch; no fsync), reading values back through the
//! mapping, and reading a segment back as recovery does. Run:
//! `cargo bench --bench segment`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use keelson::store::index::Version;
use keelson::store::segment::{encode_record, read_segment, Segments, SEGMENT_BYTES_MAX};

const VALUE: [u8; 256] = [7u8; 256];

fn version(rev: i64) -> Version<&'static [u8]> {
    Version {
        mod_rev: rev,
        create_rev: 1,
        version: rev,
        lease: 0,
        value: Some(&VALUE[..]),
    }
}

fn bench_segment(c: &mut Criterion) {
    let mut g = c.benchmark_group("segment");
    g.throughput(Throughput::Elements(1));

    let v = version(42);
    let mut out = Vec::with_capacity(1024);
    g.bench_function("encode_record_256b", |b| {
        b.iter(|| {
            out.clear();
            encode_record(&mut out, b"k0000042", black_box(&v));
            black_box(out.len());
        })
    });

    let dir = tempfile::tempdir().unwrap();
    let mut w = Segments::open(dir.path(), 0, 1, 0, SEGMENT_BYTES_MAX).unwrap();
    let mut rev = 1i64;
    g.bench_function("append_256b_flush_every_64", |b| {
        b.iter(|| {
            let mut v = version(rev);
            v.mod_rev = rev;
            w.append(format!("k{:07}", rev % 100_000).as_bytes(), &v);
            if rev % 64 == 0 {
                w.flush().unwrap();
            }
            rev += 1;
        })
    });
    w.flush().unwrap();
    drop(w);

    // Recovery read of one segment of 20k records, and reads of their
    // values through the mapping.
    let rdir = tempfile::tempdir().unwrap();
    let mut w = Segments::open(rdir.path(), 0, 1, 0, SEGMENT_BYTES_MAX).unwrap();
    let locs: Vec<_> = (1..=20_000)
        .map(|r| w.append(format!("k{:07}", r).as_bytes(), &version(r)))
        .collect();
    w.flush().unwrap();
    let mut i = 0;
    g.bench_function("value_256b_mapped", |b| {
        b.iter(|| {
            i = (i + 7919) % locs.len();
            black_box(w.value(locs[i]).len());
        })
    });
    drop(w);
    g.throughput(Throughput::Elements(20_000));
    g.sample_size(20);
    g.bench_function("read_segment_20k_records", |b| {
        b.iter(|| {
            let mut n = 0u32;
            read_segment(rdir.path(), 1, None, |_, _| n += 1).unwrap();
            assert_eq!(n, 20_000);
        })
    });
    g.finish();
}

criterion_group!(benches, bench_segment);
criterion_main!(benches);
