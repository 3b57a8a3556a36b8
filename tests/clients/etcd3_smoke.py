"""python-etcd3 (the gRPC client for Python) against a server on
127.0.0.1:PORT: every call checked, a failed check exits 1.

Run by tests/python_clients.rs with the venv scripts/install-deps.sh makes.
"""
import sys
import threading
import time

import etcd3

c = etcd3.client(host="127.0.0.1", port=int(sys.argv[1]))

st = c.status()
assert st.version and st.leader is not None and st.raft_index > 0, st
assert [m.name for m in c.members] != [], "members"

c.put("foo", "bar")
v, meta = c.get("foo")
assert v == b"bar" and meta.key == b"foo" and meta.version == 1, (v, meta)
assert c.put("foo", "baz", prev_kv=True).prev_kv.value == b"bar"
assert c.get("nope") == (None, None)

for i in range(3):
    c.put("p/%d" % i, str(i))
assert [v for v, _ in c.get_prefix("p/")] == [b"0", b"1", b"2"]
assert [v for v, _ in c.get_prefix("p/", sort_order="descend")] == [b"2", b"1", b"0"]
assert len(list(c.get_all())) == 4

ok, _ = c.transaction(
    compare=[c.transactions.value("foo") == "baz"],
    success=[c.transactions.put("t", "1")],
    failure=[c.transactions.put("t", "0")],
)
assert ok is True
ok, resps = c.transaction(
    compare=[c.transactions.version("nope") == 0],
    success=[c.transactions.get("t")],
    failure=[],
)
assert ok is True and resps[0][0][0] == b"1", resps
ok, _ = c.transaction(
    compare=[c.transactions.create("foo") > 1_000_000_000],
    success=[],
    failure=[c.transactions.delete("t")],
)
assert ok is False and c.get("t") == (None, None)

assert c.delete("foo") is True
assert c.delete("foo") is False
assert c.delete_prefix("p/").deleted == 3

lease = c.lease(10)
assert 0 < lease.remaining_ttl <= 10
c.put("leased", "x", lease=lease)
assert lease.keys == [b"leased"]
assert lease.refresh()[0].TTL == 10
lease.revoke()
assert c.get("leased") == (None, None)

lock = c.lock("mylock", ttl=5)
assert lock.acquire(timeout=5) is True
assert lock.is_acquired() is True
assert lock.release() is True

assert list(c.list_alarms()) == []
assert isinstance(c.hash(), int)
c.defragment()

c.put("w", "0")
events = []
it, cancel = c.watch("w")


def consume():
    for e in it:
        events.append((type(e).__name__, e.key, e.value))
        if len(events) >= 2:
            break


t = threading.Thread(target=consume)
t.start()
time.sleep(0.5)
c.put("w", "1")
c.delete("w")
t.join(10)
cancel()
assert events == [("PutEvent", b"w", b"1"), ("DeleteEvent", b"w", b"")], events

c.put("w", "2")
c.compact(c.get("w")[1].mod_revision)
print("etcd3: all checks passed")
