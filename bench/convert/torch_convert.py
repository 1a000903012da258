"""The PyTorch ways of getting HF safetensors out of a checkpoint, timed from start to finish (one JSON line on stdout).

usage: python bench/convert/torch_convert.py seed <dcp-dir> <out-dir>
         the seed's path (NeMo-RL convert_dcp_to_hf) plus safetensors: dcp_to_torch_save → torch.load → unwrap
         {"model": …} → safetensors.torch.save_file(…, metadata={"format": "pt"}) as <out>/model.safetensors
         (the intermediate pytorch_model.bin is written inside <out> and deleted, as part of the timed work)
       python bench/convert/torch_convert.py cast:<dtype> <hf-dir> <out-dir>
         the naive cast of a Hugging Face folder: safetensors.torch.load_file → .to(dtype) for floating tensors →
         save_file (what a casting conversion is measured against)
       python bench/convert/torch_convert.py consolidate <hf-sharded-dir> <out-dir>
         torch.distributed.checkpoint._consolidate_hf_safetensors.consolidate_safetensors_files, every tensor to
         output file 1 (the input is HuggingFaceStorageWriter(save_distributed=True) shards: make_hf_sharded.py)
"""
import json
import os
import sys
import time

import torch


def seed(dcp_dir, out):
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "pytorch_model.bin")
    dcp_to_torch_save(dcp_dir, tmp)
    sd = torch.load(tmp, weights_only=True)
    if set(sd) == {"model"}:
        sd = sd["model"]
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    os.remove(tmp)
    seconds = time.perf_counter() - t0
    return seconds, sum(t.numel() * t.element_size() for t in sd.values())


def consolidate(src, out):
    from safetensors import safe_open
    from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files

    names = set()
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(src, f), framework="pt") as so:
                names.update(so.keys())
    mapping = {n: 1 for n in sorted(names)}
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    consolidate_safetensors_files(src, out, fqn_to_index_mapping=mapping)
    seconds = time.perf_counter() - t0
    total = 0
    for f in os.listdir(out):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(out, f), framework="pt") as so:
                for k in so.keys():
                    sl = so.get_slice(k)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    total += n * {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}.get(sl.get_dtype(), 1)
    return seconds, total


def cast(dtype, src, out):
    from safetensors.torch import load_file, save_file

    to = getattr(torch, dtype)
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    sd = load_file(os.path.join(src, "model.safetensors"))
    sd = {k: (v.to(to) if v.is_floating_point() else v) for k, v in sd.items()}
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    fd = os.open(os.path.join(out, "model.safetensors"), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - t0
    return seconds, sum(t.numel() * t.element_size() for t in sd.values())


if __name__ == "__main__":
    mode, src, out = sys.argv[1:4]
    if mode == "seed":
        seconds, nbytes = seed(src, out)
    elif mode.startswith("cast:"):
        seconds, nbytes = cast(mode[5:], src, out)
    else:
        seconds, nbytes = consolidate(src, out)
    print(json.dumps({"seconds": seconds, "bytes": nbytes}))
