"""Loads a DCP checkpoint with torch.distributed.checkpoint and exports what torch sees, to check a writer.

usage: python interop/load_with_torch.py <ckpt> <out-dir> [--resave]

Loads <ckpt> two ways, each into <out-dir>/<method>/expected.json + expected.safetensors (the layout
__test__/helpers.ts `loadExpected` parses: {"torch_version", "world_size", "tensors": {key: {dtype, shape}},
"objects": {key: typed}, "tree": typed}; every tensor's bytes as a flat uint8 tensor under its flat key):
  dcp_load            dcp.load into a state dict built from the metadata (torch.empty tensors of the recorded dtype
                      and size at the planner_data paths, placeholders for the other values; each top-level entry is
                      wrapped in a Stateful, because torch 2.3's dcp.load only hands non-tensor values back that way)
  dcp_to_torch_save   torch.distributed.checkpoint.format_utils.dcp_to_torch_save, then torch.load of the result
--resave: also dcp.save what dcp_load loaded into <out-dir>/resaved and compare it with <ckpt> (data files byte
for byte, metadata field by field).

Prints a JSON summary on stdout: {"torch_version", "methods": {name: "ok" | "<error>"}, "resave": {...}}. A method
that fails is reported, not raised, so one run shows everything this torch version can and cannot do.
"""
import argparse
import base64
import collections.abc
import json
import os
import platform
import struct
import sys
import traceback
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import dtype_name, enc  # noqa: E402

try:
    from torch.distributed.checkpoint.stateful import Stateful
except ImportError:  # pragma: no cover
    Stateful = object

warnings.filterwarnings("ignore")


def raw_bytes(t):
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) if t.numel() else b""


def get_element(tree, path):
    cur = tree
    for p in path:
        if isinstance(cur, collections.abc.Mapping):
            cur = cur[p] if p in cur else next(v for k, v in cur.items() if str(k) == p)
        else:
            cur = cur[p]
    return cur


def set_element(root, path, value):
    """Puts value at path, creating dicts (str step) and lists (int step, padded with None) on the way."""
    cur = root
    for i, p in enumerate(path):
        if isinstance(cur, list):
            while len(cur) <= p:
                cur.append(None)
        if i == len(path) - 1:
            cur[p] = value
            return
        nxt = cur.get(p) if isinstance(cur, dict) else cur[p]
        if nxt is None:
            nxt = [] if isinstance(path[i + 1], int) else {}
            cur[p] = nxt
        cur = nxt


def enc_tree(v, path, inv, tensor_keys):
    if path in inv:
        key = inv[path]
        if key in tensor_keys:
            assert isinstance(v, torch.Tensor), (key, type(v))
            return {"t": "tensor", "key": key}
        return enc(v)
    if isinstance(v, collections.abc.Mapping):
        return {"t": "dict", "v": [[enc(k), enc_tree(x, path + (str(k),), inv, tensor_keys)] for k, x in v.items()]}
    if isinstance(v, list):
        return {"t": "list", "v": [enc_tree(x, path + (i,), inv, tensor_keys) for i, x in enumerate(v)]}
    raise AssertionError(f"value at {path} ({type(v).__name__}) has no flat key")


def write_safetensors(path, tensors):
    """A safetensors file of flat uint8 tensors (written by hand: no dependency on the safetensors package)."""
    header, offset, blobs = {}, 0, []
    for k, b in tensors.items():
        header[k] = {"dtype": "U8", "shape": [len(b)], "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def export(out, tree, md):
    sdm, planner = md.state_dict_metadata, md.planner_data
    inv = {tuple(p): k for k, p in planner.items()}
    tensor_keys = [k for k in sdm if isinstance(sdm[k], TensorStorageMetadata)]
    object_keys = [k for k in sdm if isinstance(sdm[k], BytesStorageMetadata)]
    tensors = {k: get_element(tree, planner[k]) for k in tensor_keys}
    for k, t in tensors.items():
        assert isinstance(t, torch.Tensor), k
        assert t.dtype == sdm[k].properties.dtype and tuple(t.shape) == tuple(sdm[k].size), k
    expected = {
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "world_size": 1,
        "tensors": {k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape)} for k, t in tensors.items()},
        "objects": {k: enc(get_element(tree, planner[k])) for k in object_keys},
        "tree": enc_tree(tree, (), inv, set(tensor_keys)),
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False)
    write_safetensors(os.path.join(out, "expected.safetensors"), {k: raw_bytes(t) for k, t in tensors.items()})


class Holder(Stateful):
    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, value):
        self.value = value


UNSET = "__distcp_unset__"


def template(md):
    root = {}
    for k, path in md.planner_data.items():
        m = md.state_dict_metadata[k]
        if isinstance(m, TensorStorageMetadata):
            v = torch.empty(tuple(m.size), dtype=m.properties.dtype)
        else:
            v = UNSET
        set_element(root, tuple(path), v)
    return root


def via_dcp_load(ckpt, md):
    holders = {k: Holder(v) for k, v in template(md).items()}
    dcp.load(holders, checkpoint_id=ckpt)
    tree = {k: h.value for k, h in holders.items()}
    for k, path in md.planner_data.items():
        assert not (isinstance(get_element(tree, path), str) and get_element(tree, path) == UNSET), f"{k} not loaded"
    return tree


def via_torch_save(ckpt, out):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    pt = os.path.join(out, "converted.pt")
    dcp_to_torch_save(ckpt, pt)
    return torch.load(pt, weights_only=False)


def compare_resave(ckpt, resaved):
    """Field by field: the two checkpoints' metadata; byte for byte: their data files."""
    a = FileSystemReader(ckpt).read_metadata()
    b = FileSystemReader(resaved).read_metadata()
    diffs = []
    if list(a.state_dict_metadata) != list(b.state_dict_metadata):
        diffs.append("state_dict_metadata keys or order differ")
    for k in a.state_dict_metadata:
        ma, mb = a.state_dict_metadata[k], b.state_dict_metadata.get(k)
        if type(ma) is not type(mb):
            diffs.append(f"{k}: {type(ma).__name__} vs {type(mb).__name__}")
        elif isinstance(ma, TensorStorageMetadata):
            if (ma.properties.dtype, ma.size, ma.chunks) != (mb.properties.dtype, mb.size, mb.chunks):
                diffs.append(f"{k}: tensor metadata differs")
    if {k: tuple(v) for k, v in a.planner_data.items()} != {k: tuple(v) for k, v in b.planner_data.items()}:
        diffs.append("planner_data differs")
    sa = {(i.fqn, tuple(i.offset) if i.offset is not None else None): (s.relative_path, s.offset, s.length)
          for i, s in a.storage_data.items()}
    sb = {(i.fqn, tuple(i.offset) if i.offset is not None else None): (s.relative_path, s.offset, s.length)
          for i, s in b.storage_data.items()}
    if sa != sb:
        diffs.append(f"storage_data differs: {sorted(set(sa.items()) ^ set(sb.items()))[:6]}")
    files = {}
    for name in sorted({s[0] for s in sa.values()} | {s[0] for s in sb.values()}):
        fa, fb = os.path.join(ckpt, name), os.path.join(resaved, name)
        da = open(fa, "rb").read() if os.path.exists(fa) else None
        db = open(fb, "rb").read() if os.path.exists(fb) else None
        if da == db:
            files[name] = "identical"
        else:
            n = min(len(da or b""), len(db or b""))
            first = next((i for i in range(n) if da[i] != db[i]), n)
            files[name] = f"differ: {len(da or b'')} vs {len(db or b'')} bytes, first difference at {first}"
    return {"metadata_differences": diffs, "files": files}


def first_line(e):
    """The gist of an error: torch's CheckpointException carries whole remote tracebacks; keep their last line."""
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else repr(e)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--resave", action="store_true")
    args = ap.parse_args()
    summary = {"torch_version": torch.__version__, "python_version": platform.python_version(), "methods": {}}
    try:
        md = FileSystemReader(args.ckpt).read_metadata()
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        summary["methods"]["read_metadata"] = f"{type(e).__name__}: {first_line(e)}"
        print(json.dumps(summary))
        return
    loaded = None
    for name, load in (("dcp_load", lambda: via_dcp_load(args.ckpt, md)),
                       ("dcp_to_torch_save", lambda: via_torch_save(args.ckpt, os.path.join(args.out, name)))):
        try:
            os.makedirs(os.path.join(args.out, name), exist_ok=True)
            tree = load()
            export(os.path.join(args.out, name), tree, md)
            summary["methods"][name] = "ok"
            if name == "dcp_load":
                loaded = tree
        except BaseException as e:  # noqa: BLE001 (torch ≤ 2.3's CheckpointException is a BaseException)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            traceback.print_exc(file=sys.stderr)
            summary["methods"][name] = f"{type(e).__name__}: {first_line(e)}"
    if args.resave and loaded is not None:
        resaved = os.path.join(args.out, "resaved")
        try:
            dcp.save(loaded, checkpoint_id=resaved)
            summary["resave"] = compare_resave(args.ckpt, resaved)
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            traceback.print_exc(file=sys.stderr)
            summary["resave"] = {"error": f"{type(e).__name__}: {first_line(e)}"}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
