//! The shard store: an in-memory MVCC index per shard and append-only
//! segment files that hold the values (the index keeps where each value
//! is; reads go through a read-only mapping of the files), plus a
//! checkpoint recording how far the segments are durable.
//!
//! *Architecture invariant:* the store never sees a Raft message, a socket or
//! a gRPC frame; it is handed operations at a revision and answers with
//! partial results that `kv` merges.

pub mod index;
pub mod segment;
pub mod shard;

/// Which shard owns `key`: FNV-1a (64 bit) of the key modulo the shard count.
/// This function is part of the on-disk format: changing it would move keys
/// between shards of an existing data dir.
pub fn shard_of(key: &[u8], shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % shards as u64) as usize
}
