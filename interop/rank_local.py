"""Rank-local DCP checkpoints (`dcp.save(..., use_collectives=False)`: every rank writes its own `__{rank}.metadata`
and `__{rank}_0.distcp`, no `.metadata`), written and loaded by real torch on N gloo ranks, for the retarget tests.

usage:
  python interop/rank_local.py save <out-dir> <ranks>
      <out-dir>/ckpt: the checkpoint; <out-dir>/expected-rank{r}.safetensors: what rank r saved (its tensors, and
      its int `step` as a 0-d int64 tensor)
  python interop/rank_local.py load <ckpt> <out-dir> <ranks>
      every rank r loads the checkpoint with dcp.load (which falls back from the missing .metadata to
      __{r}.metadata) into a state dict shaped by that file, and writes what it loaded to
      <out-dir>/rank{r}.safetensors (same form as expected-rank{r}.safetensors)

Prints {"torch_version", "ranks": {r: "ok" | "<error>"}} on stdout; a rank that fails is reported, not raised.
"""
import json
import logging
import os
import socket
import sys
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
logging.getLogger().setLevel(logging.ERROR)  # dcp.load logs the fallback to rank-local metadata as a warning


def state_dict(rank):
    g = torch.Generator().manual_seed(1234 + rank)
    return {
        "w": torch.randn(3, 4 + rank, generator=g),  # ranks differ in shape, so each must read its own file
        "b": torch.randn(5, generator=g).to(torch.bfloat16),
        "ids": torch.randint(0, 1000, (6,), generator=g, dtype=torch.int64),
        "step": 10 + rank,
    }


def as_tensors(sd):
    return {k: (v.contiguous() if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.int64)) for k, v in sd.items()}


def save(rank, out):
    sd = state_dict(rank)
    dcp.save(sd, checkpoint_id=os.path.join(out, "ckpt"), use_collectives=False)
    save_file(as_tensors(sd), os.path.join(out, f"expected-rank{rank}.safetensors"))
    return "ok"


def load(rank, ckpt, out):
    md = FileSystemReader(ckpt).read_metadata(rank=rank)
    sd = {}
    for k, m in md.state_dict_metadata.items():
        sd[k] = torch.empty(m.size, dtype=m.properties.dtype) if isinstance(m, TensorStorageMetadata) else 0
    dcp.load(sd, checkpoint_id=ckpt)
    save_file(as_tensors(sd), os.path.join(out, f"rank{rank}.safetensors"))
    return "ok"


def worker(rank, world, port, mode, args, results):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        status = save(rank, *args) if mode == "save" else load(rank, *args)
    except Exception as e:  # reported, not raised: the test asserts on it
        status = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        traceback.print_exc()
    with open(os.path.join(results, f"{rank}.json"), "w") as f:
        json.dump(status, f)
    dist.barrier()
    # gloo's teardown sometimes aborts or hangs once a peer is gone; spawn only looks at the exit code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main():
    mode = sys.argv[1]
    if mode == "save":
        out, world = sys.argv[2], int(sys.argv[3])
        args, results = (out,), out
    else:
        ckpt, out, world = sys.argv[2], sys.argv[3], int(sys.argv[4])
        args, results = (ckpt, out), out
    os.makedirs(out, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(worker, args=(world, port, mode, args, results), nprocs=world, join=True, start_method="spawn")
    ranks = {}
    for r in range(world):
        with open(os.path.join(results, f"{r}.json")) as f:
            ranks[str(r)] = json.load(f)
        os.remove(os.path.join(results, f"{r}.json"))
    print(json.dumps({"torch_version": torch.__version__, "ranks": ranks}))


if __name__ == "__main__":
    main()
