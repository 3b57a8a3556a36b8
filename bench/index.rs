//! Criterion benches for the in-memory MVCC index as the shard uses it (each
//! version keeps where its value is, a `Loc`): put (new and existing keys),
//! point reads at the latest and at an old revision, a 100-key range, and
//! compaction. Puts go through `put_after`, the shard's one-lookup put.
//! Run: `cargo bench --bench index`.

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use keelson::store::index::{End, Index};
use keelson::store::segment::Loc;

const KEYS: usize = 100_000;

fn key(i: usize) -> Vec<u8> {
    // 8-byte keys, as in the workload.
    format!("k{:07}", i).into_bytes()
}

/// An index with `KEYS` keys, each written `versions` times.
/// Where a 256-byte value written at `rev` might be.
fn loc(rev: i64) -> Loc {
    Loc {
        seg: 1 + (rev as u32 >> 18),
        off: (rev as u32 & 0x3ffff) * 300,
        len: 256,
    }
}

fn filled(versions: usize) -> Index<Loc> {
    let mut ix = Index::new();
    let mut rev = 1;
    for _ in 0..versions {
        for i in 0..KEYS {
            ix.put_after(&key(i), rev, |_, _, _| (0, loc(rev)));
            rev += 1;
        }
    }
    ix
}

fn bench_index(c: &mut Criterion) {
    let keys: Vec<Vec<u8>> = (0..KEYS).map(key).collect();

    let mut g = c.benchmark_group("index");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("put_1000_new_keys", |b| {
        b.iter_batched_ref(
            Index::new,
            |ix| {
                for (i, k) in keys.iter().take(1000).enumerate() {
                    ix.put_after(k, i as i64 + 1, |_, _, _| (0, loc(i as i64 + 1)));
                }
            },
            BatchSize::SmallInput,
        )
    });

    g.throughput(Throughput::Elements(1));
    let mut ix = filled(1);
    let mut rev = KEYS as i64 + 1;
    let mut i = 0;
    g.bench_function("put_existing_key", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            ix.put_after(&keys[i], rev, |_, _, _| (0, loc(rev)));
            rev += 1;
        })
    });

    let ix = filled(4);
    let head = 4 * KEYS as i64;
    let mut i = 0;
    g.bench_function("get_latest", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            black_box(ix.get(&keys[i], head));
        })
    });
    g.bench_function("get_old_revision", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            black_box(ix.get(&keys[i], KEYS as i64 + 1 + i as i64));
        })
    });

    g.throughput(Throughput::Elements(100));
    g.bench_function("range_100_keys", |b| {
        b.iter(|| {
            i = (i + 7919) % (KEYS - 100);
            let mut n = 0;
            ix.range(&keys[i], End::Before(&keys[i + 100]), head, |_, _| {
                n += 1;
                true
            });
            assert_eq!(n, 100);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("index_compact");
    g.sample_size(10);
    g.throughput(Throughput::Elements(KEYS as u64));
    g.bench_function("compact_100k_keys_4_versions", |b| {
        b.iter_batched(
            || filled(4),
            |mut ix| ix.compact(3 * KEYS as i64),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_index);
criterion_main!(benches);
