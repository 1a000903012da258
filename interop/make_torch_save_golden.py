"""Writes the reference archives the Rust writer is compared with, byte for byte (crates/distcp-core/tests/).

usage: python interop/make_torch_save_golden.py [--out crates/distcp-core/tests/golden/torch_save] [--zip64]

Every case is a value in the tagged JSON the writer takes (see crates/distcp-core/src/write/value.rs: null, bool,
integer numbers, str, arrays = lists, {"$f": hex bits}, {"$i": decimal}, {"$t": [...]}, {"$d": [[k, v], ...]},
{"$b": buffer}, {"$tensor": buffer, "dtype", "shape"}) plus hex buffers. The script decodes each case into Python
objects (strings come from json.loads, as they would from any decoder), runs `torch.save(value, io.BytesIO())` and
writes <out>/<name>.bin next to <out>/manifest.json {"torch_version", "python_version", "cases": [{name, value,
buffers}]} (a buffer is hex, or {"pattern": n, "bool": b} for the bytes `pattern(n, b)` below makes).

--zip64 also writes zip64_head.bin / zip64_tail.bin: torch.save of a uint8 tensor of 2**32 bytes (a 4 GiB
temporary file) without the 4 GiB of data in the middle (needs ~4 GiB of disk, ~15 s).
"""
import argparse
import io
import json
import os
import platform
import struct
import sys
import tempfile

import torch

DTYPES = [
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
    "float8_e5m2fnuz", "float8_e8m0fnu", "int64", "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8",
    "bool", "complex128", "complex64", "complex32",
]


def esize(name):
    return torch.empty((), dtype=getattr(torch, name)).element_size()


def pattern(n, bool_=False):
    return bytes((i % 2 if bool_ else (i * 37 + 11) % 256) for i in range(n))


class Case:
    def __init__(self, name, value, buffers=()):
        self.name, self.value, self.buffers = name, value, list(buffers)


def tensor_case(name, dtype, shape):
    n = esize(dtype)
    for d in shape:
        n *= d
    return Case(name, {"$tensor": 0, "dtype": dtype, "shape": shape}, [pattern(n, dtype == "bool")])


def fbits(x):
    return {"$f": struct.pack(">d", x).hex()}


def cases():
    out = [tensor_case("f32_2x3", "float32", [2, 3])]
    out += [tensor_case(f"dtype_{d}", d, [2, 3]) for d in DTYPES if hasattr(torch, d)]
    out += [
        tensor_case("zero_dim", "float32", []),
        tensor_case("empty_0x3", "float32", [0, 3]),
        tensor_case("empty_2x0x3", "int64", [2, 0, 3]),
        tensor_case("five_dims_u16", "uint16", [1, 2, 1, 2, 1]),
        tensor_case("bool_70000", "bool", [70000]),
        tensor_case("bf16_300x2", "bfloat16", [300, 2]),
    ]
    ints = [0, 1, 255, 256, 65535, 65536, -1, -129, -(2**31), -(2**31) - 1, 2**31 - 1, 2**31, 2**53, -(2**53)]
    out += [
        Case("float", fbits(0.001)),
        Case("floats", [fbits(x) for x in (float("nan"), -0.0, float("inf"), -float("inf"), 1e-300, 5e-324)]),
        Case("int", 3),
        Case("ints", [i if abs(i) < 2**53 else {"$i": str(i)} for i in ints]),
        Case("bigints", [{"$i": str(i)} for i in (2**63, -(2**63), 2**64, -(2**64), 2**70, -(2**70) - 1, 2**2100)]),
        Case("str", "héllo ☃ \U0001f600"),
        Case("strs", ["", "", "a", "a", "é", "é", "ĉ", "ĉ", "ab", "ab", "storage", "cpu", "latin1"]),
        Case("bytes", {"$b": 0}, [b"ab\xff"]),
        Case("bytes_mixed", [{"$b": 0}, {"$b": 1}, {"$b": 2}, {"$b": 3}, {"$b": 4}, "a", "latin1"],
             [b"", b"", b"a", b"a", bytes(range(256))]),
        Case("list", [1, fbits(2.5), "x"]),
        Case("list_1001", list(range(1001))),
        Case("tuple1", {"$t": [1]}),
        Case("tuples", {"$t": [{"$t": []}, {"$t": [1, 2]}, {"$t": [1, 2, 3]}, {"$t": [1, 2, 3, 4]}]}),
        Case("dict", {"$d": [["a", 1], ["b", [None, True, False]]]}),
        Case("dict_1", {"$d": [["only", None]]}),
        Case("dict_1000", {"$d": [[f"k{i}", i] for i in range(1000)]}),
        Case("dict_int_keys", {"$d": [[0, "zero"], [1, {"$t": ["a", fbits(0.5)]}]]}),
        Case("empty_dict", {"$d": []}),
        Case("empty_list", []),
        Case("empty_tuple", {"$t": []}),
        Case("none", None),
        Case("true", True),
        Case("strings_300", [f"s{i}" for i in range(300)]),
        Case("param_group", {"$d": [["lr", fbits(0.001)], ["betas", {"$t": [fbits(0.9), fbits(0.999)]}],
                                    ["eps", fbits(1e-8)], ["weight_decay", 0], ["amsgrad", False],
                                    ["params", ["layer1.weight", "layer1.bias"]]]}),
        Case("tuple_of_tensors", {"$t": [{"$tensor": 0, "dtype": "float32", "shape": [2]}, "cpu",
                                         {"$tensor": 1, "dtype": "float8_e5m2", "shape": [3]}, "storage"]},
             [pattern(8), pattern(3)]),
        Case("twenty_tensors", {"$t": [{"$tensor": i, "dtype": "int16", "shape": [i % 3]} for i in range(20)]},
             [pattern(2 * (i % 3)) for i in range(20)]),
    ]
    return out


def enc_buffer(b):
    """Hex, or {"pattern": n, "bool": ...} for the long deterministic buffers of `pattern`."""
    for is_bool in (False, True):
        if len(b) > 64 and b == pattern(len(b), is_bool):
            return {"pattern": len(b), "bool": is_bool}
    return b.hex()


def decode(v, buffers):
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, list):
        return [decode(x, buffers) for x in v]
    if "$f" in v:
        return struct.unpack(">d", bytes.fromhex(v["$f"]))[0]
    if "$i" in v:
        return int(v["$i"])
    if "$t" in v:
        return tuple(decode(x, buffers) for x in v["$t"])
    if "$d" in v:
        return {decode(k, buffers): decode(x, buffers) for k, x in v["$d"]}
    if "$b" in v:
        return bytes(buffers[v["$b"]])
    if "$tensor" in v:
        raw = torch.frombuffer(bytearray(buffers[v["$tensor"]]) or bytearray(1), dtype=torch.uint8)
        raw = raw[: len(buffers[v["$tensor"]])]
        t = raw.view(getattr(torch, v["dtype"])).reshape(v["shape"])
        return t.clone()
    raise ValueError(v)


def zip64(out):
    t = torch.zeros(2**32, dtype=torch.uint8)
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        with open(path, "wb") as f:
            torch.save(t, f)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4096)
            # data/0 is the 5th record; its data starts where the local header says
            i = head.index(b"archive/data/0") - 30
            nlen, elen = struct.unpack("<HH", head[i + 26 : i + 30])
            start = i + 30 + nlen + elen
            f.seek(start + 2**32)
            tail = f.read()
        with open(os.path.join(out, "zip64_head.bin"), "wb") as f:
            f.write(head[:start])
        with open(os.path.join(out, "zip64_tail.bin"), "wb") as f:
            f.write(tail)
        print(f"zip64: {size} bytes, data at {start}", file=sys.stderr)
    finally:
        os.unlink(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join("crates", "distcp-core", "tests", "golden", "torch_save"))
    ap.add_argument("--zip64", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    manifest = {"torch_version": torch.__version__, "python_version": platform.python_version(), "cases": []}
    for c in cases():
        # through JSON and back, so every string is made by a decoder, as the Rust side's are
        value = json.loads(json.dumps(c.value))
        buf = io.BytesIO()
        torch.save(decode(value, c.buffers), buf)
        with open(os.path.join(args.out, c.name + ".bin"), "wb") as f:
            f.write(buf.getvalue())
        manifest["cases"].append({"name": c.name, "value": c.value, "buffers": [enc_buffer(b) for b in c.buffers]})
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        head = {k: v for k, v in manifest.items() if k != "cases"}
        f.write(json.dumps(head)[:-1] + ', "cases": [\n')
        f.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in manifest["cases"]))
        f.write("\n]}\n")
    if args.zip64:
        zip64(args.out)


if __name__ == "__main__":
    main()
