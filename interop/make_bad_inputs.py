"""Writes broken and hostile DCP checkpoints for distcp's bad-input tests, starting from a real torch save.

usage: python interop/make_bad_inputs.py <out-dir>

Every variant is derived by torch/CPython from a checkpoint torch itself wrote (`base`), so the tests never
depend on hand-edited bytes. Prints a JSON manifest {variant: {"ckpt": path, "key": key the error must name}}.
"""
import copy
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex


def save_base(path):
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": 7}
    dcp.save(sd, checkpoint_id=path)


def clone(base, out, name):
    dst = os.path.join(out, name, "ckpt")
    shutil.copytree(base, dst)
    return dst


def write_metadata(ckpt, md):
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(md, f)


def tensor_index(md, fqn):
    return next(k for k in md.storage_data if k.fqn == fqn and k.offset is not None)


def replace_blob(ckpt, md, fqn, new_blob):
    """Appends new_blob to the item's data file and points the item's storage info at it."""
    idx = tensor_index(md, fqn)
    info = md.storage_data[idx]
    path = os.path.join(ckpt, info.relative_path)
    offset = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(new_blob)
    info.offset = offset
    info.length = len(new_blob)
    write_metadata(ckpt, md)


def read_blob(ckpt, md, fqn):
    info = md.storage_data[tensor_index(md, fqn)]
    with open(os.path.join(ckpt, info.relative_path), "rb") as f:
        f.seek(info.offset)
        return f.read(info.length)


def rezip(blob, compress=None, shrink_data=False):
    src = zipfile.ZipFile(io.BytesIO(blob))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if shrink_data and item.filename.endswith("/data/0"):
                data = data[:-4]  # one float32 element short of shape × dtype
            method = compress if (compress is not None and item.filename.endswith("/data/0")) else zipfile.ZIP_STORED
            dst.writestr(item.filename, data, compress_type=method)
    return buf.getvalue()


class Hostile:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def main(out):
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, "base", "ckpt")
    save_base(base)
    md = FileSystemReader(base).read_metadata()
    manifest = {"base": {"ckpt": base, "key": None}}
    marker = os.path.join(out, "PWNED")

    for name, fn, args in [
        ("hostile-os-system", os.system, ("touch " + marker,)),
        ("hostile-eval", eval, ("__import__('os').system('touch " + marker + "')",)),
        ("hostile-popen", subprocess.Popen, (["touch", marker],)),
    ]:
        ckpt = clone(base, out, name)
        with open(os.path.join(ckpt, ".metadata"), "wb") as f:
            pickle.dump(Hostile(fn, args), f)
        manifest[name] = {"ckpt": ckpt, "key": None, "marker": marker}

    # relative_path escaping the folder: `..`, and an absolute path (both to real copies of the data file)
    ckpt = clone(base, out, "escape-dotdot")
    shutil.copy(os.path.join(base, "__0_0.distcp"), os.path.join(out, "escape-dotdot", "outside.distcp"))
    m = copy.deepcopy(md)
    for info in m.storage_data.values():
        info.relative_path = "../outside.distcp"
    write_metadata(ckpt, m)
    manifest["escape-dotdot"] = {"ckpt": ckpt, "key": None, "relative_path": "../outside.distcp"}

    ckpt = clone(base, out, "escape-absolute")
    outside = os.path.abspath(os.path.join(out, "escape-absolute", "outside.distcp"))
    shutil.copy(os.path.join(base, "__0_0.distcp"), outside)
    m = copy.deepcopy(md)
    for info in m.storage_data.values():
        info.relative_path = outside
    write_metadata(ckpt, m)
    manifest["escape-absolute"] = {"ckpt": ckpt, "key": None, "relative_path": outside}

    # a tensor record whose data/0 is one element short of shape × dtype
    ckpt = clone(base, out, "size-mismatch")
    m = copy.deepcopy(md)
    replace_blob(ckpt, m, "w", rezip(read_blob(base, md, "w"), shrink_data=True))
    manifest["size-mismatch"] = {"ckpt": ckpt, "key": "w"}

    # a deflated zip entry where torch.save stores
    ckpt = clone(base, out, "compressed-entry")
    m = copy.deepcopy(md)
    replace_blob(ckpt, m, "w", rezip(read_blob(base, md, "w"), compress=zipfile.ZIP_DEFLATED))
    manifest["compressed-entry"] = {"ckpt": ckpt, "key": "w"}

    # .metadata says the stored chunk has another shape than its record
    ckpt = clone(base, out, "shape-disagrees")
    m = copy.deepcopy(md)
    tmd = m.state_dict_metadata["w"]
    tmd.size = torch.Size([3, 3])
    tmd.chunks[0].sizes = torch.Size([3, 3])
    write_metadata(ckpt, m)
    manifest["shape-disagrees"] = {"ckpt": ckpt, "key": "w"}

    # a tensor larger than one Node buffer (metadata only; nothing that large is ever read)
    ckpt = clone(base, out, "huge-tensor")
    m = copy.deepcopy(md)
    tmd = m.state_dict_metadata["w"]
    tmd.size = torch.Size([2**31, 3])
    tmd.chunks[0].sizes = torch.Size([2**31, 3])
    write_metadata(ckpt, m)
    manifest["huge-tensor"] = {"ckpt": ckpt, "key": "w"}

    # an element count that wraps to 2 in unchecked 64-bit arithmetic: 3 × 6148914691236517206 = 2**64 + 2
    ckpt = clone(base, out, "numel-overflow")
    m = copy.deepcopy(md)
    tmd = m.state_dict_metadata["w"]
    tmd.size = torch.Size([3, 6148914691236517206])
    tmd.chunks[0].sizes = torch.Size([3, 6148914691236517206])
    write_metadata(ckpt, m)
    manifest["numel-overflow"] = {"ckpt": ckpt, "key": "w"}

    # a non-tensor item holding a stride-0 uint8 tensor of shape (2**40,): one stored byte, 1 TiB when read
    ckpt = clone(base, out, "stride0-object")
    m = copy.deepcopy(md)
    buf = io.BytesIO()
    torch.save([torch.zeros(1, dtype=torch.uint8).expand(2**40)], buf)
    idx = next(k for k in m.storage_data if k.fqn == "n")
    info = m.storage_data[idx]
    path = os.path.join(ckpt, info.relative_path)
    info.offset = os.path.getsize(path)
    info.length = len(buf.getvalue())
    with open(path, "ab") as f:
        f.write(buf.getvalue())
    write_metadata(ckpt, m)
    manifest["stride0-object"] = {"ckpt": ckpt, "key": "n"}

    # a zstd-compressed tensor item that decompresses to 256 MiB (the 2x3 float32 chunk needs under 1 KiB)
    import zstandard

    ckpt = clone(base, out, "zstd-bomb")
    m = copy.deepcopy(md)
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(256 << 20))
    replace_blob(ckpt, m, "w", bomb)
    m.storage_data[tensor_index(m, "w")].transform_descriptors = ["stream.zstd"]
    write_metadata(ckpt, m)
    manifest["zstd-bomb"] = {"ckpt": ckpt, "key": "w", "compressed_bytes": len(bomb)}

    print(json.dumps(manifest))


if __name__ == "__main__":
    main(sys.argv[1])
