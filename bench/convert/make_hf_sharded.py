"""The same Llama-shaped weights as bench/lib/make_llama_checkpoint.py (same shapes, same seed, same Shard(0) split over
N gloo ranks), but saved with torch's HuggingFaceStorageWriter(save_distributed=True): per-rank safetensors shards
carrying DCP_SHARDING_INFO, the input torch's `consolidate_safetensors_files` consumes.

usage: python bench/convert/make_hf_sharded.py <out-dir> [--ranks 2] [--layers 8] [--hidden 2048]
       [--intermediate 5632] [--vocab 32000] [--dtype bfloat16]
Keys are the model's FQNs (no `model.` wrapper: the HF writer writes state-dict keys as tensor names).
"""
import argparse
import importlib.util
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import HuggingFaceStorageWriter

try:
    from torch.distributed.tensor import Shard, distribute_tensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import Shard, distribute_tensor
from torch.distributed.device_mesh import init_device_mesh

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("make_llama_checkpoint", os.path.join(_here, "..", "lib", "make_llama_checkpoint.py"))
_mlc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mlc)


def worker(rank, a, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=a.ranks)
    mesh = init_device_mesh("cpu", (a.ranks,))
    dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in _mlc.shapes(a):  # identical generation to make_llama_checkpoint.py
        full = torch.empty(shape, dtype=torch.float32).uniform_(-0.05, 0.05, generator=g).to(dtype)
        dim = 1 if a.tp and name.endswith("_proj.weight") else 0  # as make_llama_checkpoint.py --tp
        sd[name] = distribute_tensor(full, mesh, [Shard(dim)])
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(a.out, save_distributed=True))
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tp", action="store_true")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(a, port), nprocs=a.ranks, join=True)
    files = sorted(os.listdir(a.out))
    total = sum(os.path.getsize(os.path.join(a.out, f)) for f in files)
    print(json.dumps({"out": a.out, "bytes": total, "files": files}))


if __name__ == "__main__":
    main()
