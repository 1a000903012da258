"""The same Llama-shaped weights as bench/lib/make_llama_checkpoint.py (same shapes, same seed, same Shard(0) split over
N gloo ranks), but saved with torch's HuggingFaceStorageWriter(save_distributed=True): per-rank safetensors shards
carrying DCP_SHARDING_INFO, the input torch's `consolidate_safetensors_files` consumes.

usage: python bench/convert/make_hf_sharded.py <out-dir> [--ranks 2] [--layers 8] [--hidden 2048]
       [--intermediate 5632] [--vocab 32000] [--dtype bfloat16]
Keys are the model's FQNs (no `model.` wrapper: the HF writer writes state-dict keys as tensor names).
"""
import importlib.util
import json
import os

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.device_mesh import init_device_mesh

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("make_llama_checkpoint", os.path.join(_here, "..", "lib", "make_llama_checkpoint.py"))
_mlc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mlc)


def worker(rank, a, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=a.ranks)
    mesh = init_device_mesh("cpu", (a.ranks,))
    # identical generation to make_llama_checkpoint.py, written by HuggingFaceStorageWriter instead
    dcp.save(_mlc.sharded_state(a, mesh), storage_writer=HuggingFaceStorageWriter(a.out, save_distributed=True))
    dist.barrier()
    dist.destroy_process_group()


def main():
    a = _mlc.arguments()
    _mlc.spawn_ranks(worker, a)
    files = sorted(os.listdir(a.out))
    total = sum(os.path.getsize(os.path.join(a.out, f)) for f in files)
    print(json.dumps({"out": a.out, "bytes": total, "files": files}))


if __name__ == "__main__":
    main()
