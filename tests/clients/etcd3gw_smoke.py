"""etcd3gw (OpenStack's Python client for etcd's JSON gateway) against a
server on 127.0.0.1:PORT: every call checked, a failed check exits 1.

Run by tests/python_clients.rs with the venv scripts/install-deps.sh makes.
"""
import sys
import threading
import time

import etcd3gw

c = etcd3gw.client(host="127.0.0.1", port=int(sys.argv[1]))

st = c.status()
for k in ("header", "version", "dbSize", "leader", "raftIndex", "raftTerm"):
    assert k in st, (k, st)
ms = c.members()
assert len(ms) == 1 and ms[0]["name"] and ms[0]["peerURLs"], ms

assert c.put("foo", "bar") is True
assert c.get("foo") == [b"bar"]
[(v, meta)] = c.get("foo", metadata=True)
assert v == b"bar" and meta["key"] == b"foo" and meta["version"] == "1", meta
assert int(meta["mod_revision"]) == int(meta["create_revision"]) > 0, meta
assert c.get("nope") == []

assert c.create("newkey", "v") is True
assert c.create("newkey", "v") is False
assert c.replace("foo", "bar", "baz") is True
assert c.replace("foo", "zzz", "q") is False
assert c.get("foo") == [b"baz"]

for i in range(3):
    assert c.put("p/%d" % i, str(i)) is True
assert [v for v, _ in c.get_prefix("p/")] == [b"0", b"1", b"2"]
got = c.get_prefix("p/", sort_order="descend", sort_target="key")
assert [m["key"] for _, m in got] == [b"p/2", b"p/1", b"p/0"], got

assert c.delete("foo") is True
assert c.delete("foo") is False
assert c.delete_prefix("p/") is True
assert c.get_prefix("p/") == []

lease = c.lease(ttl=10)
assert 0 < lease.ttl() <= 10
assert c.put("leased", "x", lease=lease) is True
assert lease.keys() == [b"leased"]
assert lease.refresh() == 10
assert lease.revoke() is True
assert c.get("leased") == []

lock = c.lock("mylock", ttl=5)
assert lock.acquire() is True
assert lock.is_acquired() is True
assert lock.release() is True

events = []
it, cancel = c.watch("wkey")


def consume():
    for e in it:
        events.append((e.get("type", "PUT"), e["kv"]["key"], e["kv"].get("value")))
        if len(events) >= 2:
            break


t = threading.Thread(target=consume)
t.start()
time.sleep(0.5)
c.put("wkey", "one")
c.delete("wkey")
t.join(10)
cancel()
assert events == [("PUT", b"wkey", b"one"), ("DELETE", b"wkey", None)], events
print("etcd3gw: all checks passed")
