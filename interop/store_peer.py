"""torch's own TCPStore on the other side of distcp's (__test__/distributed-store.spec.ts).

server PORTFILE [libuv|legacy]: hosts a TCPStore (is_master) on a free port, writes the port to PORTFILE, then
  waits for the Node client to set "node/done" and checks what it wrote (values, counters) from torch's side.
client PORT: connects as a torch client to a Node server and exercises every operation; prints a JSON report.
"""
import datetime
import json
import sys

import torch.distributed as dist


def server(portfile: str, backend: str) -> None:
    store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=30),
                          wait_for_workers=False, use_libuv=(backend == "libuv"))
    with open(portfile + ".tmp", "w") as f:
        f.write(str(store.port))
    import os
    os.rename(portfile + ".tmp", portfile)
    # what the Node side waits for
    store.set("py/hello", b"from torch")
    store.set("py/big", bytes(range(256)) * (8 * 1024 * 1024 // 256))
    store.wait(["node/done"])
    report = {
        "text": store.get("node/text").decode(),
        "bytes": list(store.get("node/bytes")),
        "counter": int(store.get("node/counter")),
        "multi": [v.decode() for v in store.multi_get(["node/m0", "node/m1"])],
        "cas": store.get("node/cas").decode(),
        "bigLen": len(store.get("node/big")),
        "bigSum": sum(store.get("node/big")) % 1000003,
        "libuv": store.libuvBackend,
    }
    store.set("py/report", json.dumps(report))
    store.wait(["node/bye"])


def client(port: int) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, False, timeout=datetime.timedelta(seconds=30))
    out = {}
    store.set("a", b"1")
    out["get"] = store.get("a").decode()
    out["add"] = [store.add("n", 5), store.add("n", -2)]
    out["check"] = [store.check(["a"]), store.check(["a", "missing"])]
    out["cas"] = [store.compare_set("c", "", "x").decode(), store.compare_set("c", "y", "z").decode(),
                  store.compare_set("c", "x", "w").decode()]
    store.multi_set(["m0", "m1"], ["u", "v"])
    out["multi"] = [v.decode() for v in store.multi_get(["m0", "m1"])]
    store.append("ap", b"ab")
    store.append("ap", b"cd")
    out["append"] = store.get("ap").decode()
    out["delete"] = [store.delete_key("ap"), store.delete_key("ap")]
    out["numKeys"] = store.num_keys()
    big = bytes(range(256)) * (8 * 1024 * 1024 // 256)
    store.set("big", big)
    out["big"] = store.get("big") == big
    # a key the Node side sets
    out["fromNode"] = store.get("node/x").decode()
    store.set_timeout(datetime.timedelta(milliseconds=300))
    try:
        store.wait(["never"])
        out["timeout"] = "no"
    except Exception as e:  # noqa: BLE001
        out["timeout"] = type(e).__name__
    store.set_timeout(datetime.timedelta(seconds=30))
    out["afterTimeout"] = store.get("a").decode()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "libuv")
    else:
        client(int(sys.argv[2]))
