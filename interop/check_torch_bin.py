"""Checks distcp's `pytorch_model.bin` against the seed's own artefact, made here by torch.

usage: python interop/check_torch_bin.py <our pytorch_model.bin> <dcp checkpoint dir>

The seed (NeMo-RL convert_dcp_to_hf) runs `dcp_to_torch_save(dcp, path)`, loads it, unwraps `{"model": ...}` when
that is the only key and `torch.save`s the result as `pytorch_model.bin`. We do the same in a temp folder, then
compare: `torch.load(weights_only=True)` of ours works, same keys in the same order, every tensor bit-identical,
and whether the files are byte-identical. Prints a JSON report; exits 1 on a mismatch.
"""
import json
import os
import sys
import tempfile

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

ours_path, dcp_dir = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory() as tmp:
    whole = os.path.join(tmp, "whole.bin")
    dcp_to_torch_save(dcp_dir, whole)
    sd = torch.load(whole, weights_only=True)
    if set(sd.keys()) == {"model"}:
        sd = sd["model"]
    theirs_path = os.path.join(tmp, "pytorch_model.bin")
    torch.save(sd, theirs_path)
    ours = torch.load(ours_path, weights_only=True)
    errors = []
    if list(ours.keys()) != list(sd.keys()):
        errors.append(f"keys differ: {list(ours.keys())[:5]}… vs torch {list(sd.keys())[:5]}…")
    for k, v in sd.items():
        o = ours.get(k)
        if o is None or o.dtype != v.dtype or o.shape != v.shape or not torch.equal(o.contiguous().view(torch.uint8), v.contiguous().view(torch.uint8)):
            errors.append(f"{k}: differs")
    with open(ours_path, "rb") as a, open(theirs_path, "rb") as b:
        identical = a.read() == b.read()
print(json.dumps({"tensors": len(sd), "byte_identical": identical, "errors": errors}))
sys.exit(1 if errors else 0)
