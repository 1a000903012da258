"""Consolidates torch HF-storage shards with torch's own consolidate_safetensors_files and compares the result,
tensor by tensor (name, dtype, shape, bytes), with a Hugging Face folder distcp wrote.

usage: python interop/check_consolidated.py <sharded-input-dir> <distcp-output-dir>
prints JSON {"torch_version", "keys": [...], "mismatches": [...]}
"""
import glob
import json
import os
import sys
import tempfile

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files


def tensors(folder):
    out = {}
    for f in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        out.update(load_file(f))
    return out


def main(src, ours):
    keys = set()
    for f in glob.glob(os.path.join(src, "*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            keys.update(k for k in json.loads(fh.read(n)) if k != "__metadata__")
    with tempfile.TemporaryDirectory() as out:
        consolidate_safetensors_files(src, out, {k: 1 for k in keys})
        want = tensors(out)
    got = tensors(ours)
    mismatches = []
    for k in sorted(set(want) | set(got)):
        a, b = got.get(k), want.get(k)
        if a is None or b is None:
            mismatches.append(f"{k}: only in {'torch' if a is None else 'distcp'}")
        elif a.dtype != b.dtype or a.shape != b.shape:
            mismatches.append(f"{k}: {a.dtype} {list(a.shape)} vs torch {b.dtype} {list(b.shape)}")
        elif not torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)):
            mismatches.append(f"{k}: bytes differ")
    print(json.dumps({"torch_version": torch.__version__, "keys": sorted(want), "mismatches": mismatches}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
