"""Writes a Llama-shaped DCP checkpoint with real torch (gloo, CPU), sharded over N ranks (DTensor Shard(0)).

usage: python bench/lib/make_llama_checkpoint.py <out-dir> [--ranks 2] [--layers 8] [--hidden 2048]
       [--intermediate 5632] [--vocab 32000] [--dtype bfloat16] [--tp]
--tp: tensor-parallel layout, the attention and MLP projections column-sharded (Shard(1)) over the ranks, the rest
Shard(0); with a rank count that does not divide the sizes the shards are uneven, as torch makes them.
Defaults give ≈1.1 GB of bf16 weights (Llama layout: embed_tokens, q/k/v/o_proj, gate/up/down_proj, norms, lm_head),
saved the seed's way: {"model": state_dict}.
"""
import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

try:
    from torch.distributed.tensor import Shard, distribute_tensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import Shard, distribute_tensor
from torch.distributed.device_mesh import init_device_mesh


def shapes(a):
    h, i, v = a.hidden, a.intermediate, a.vocab
    out = [("model.embed_tokens.weight", (v, h))]
    for l in range(a.layers):
        p = f"model.layers.{l}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (h, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def sharded_state(a, mesh):
    """The Llama-shaped state dict as DTensors on `mesh`: the same full tensors on every rank (one seeded
    generator), each rank keeping its Shard(0) slice (Shard(1) for the projections with --tp)."""
    dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in shapes(a):
        full = torch.empty(shape, dtype=torch.float32).uniform_(-0.05, 0.05, generator=g).to(dtype)
        dim = 1 if a.tp and name.endswith("_proj.weight") else 0
        sd[name] = distribute_tensor(full, mesh, [Shard(dim)])
    return sd


def arguments():
    """The command line every generator of this benchmark data takes."""
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tp", action="store_true")
    return ap.parse_args()


def spawn_ranks(worker, a):
    """Runs `worker(rank, a, port)` on `a.ranks` gloo ranks of one machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(a, port), nprocs=a.ranks, join=True)


def worker(rank, a, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=a.ranks)
    mesh = init_device_mesh("cpu", (a.ranks,))
    dcp.save({"model": sharded_state(a, mesh)}, checkpoint_id=a.out)
    dist.barrier()
    dist.destroy_process_group()


def main():
    a = arguments()
    spawn_ranks(worker, a)
    total = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(f"wrote {a.out}: {total / 1e9:.2f} GB in {len(os.listdir(a.out))} files")


if __name__ == "__main__":
    main()
