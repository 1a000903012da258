"""Writes an MoE-shaped DCP checkpoint with real torch, one rank (no process group): many small tensors, where a
conversion's cost per tensor shows and the bytes do not.

usage: python bench/convert/make_moe_checkpoint.py <out-dir> [--layers 32] [--experts 64] [--dim 64]
Defaults: 32 layers × 64 experts × (gate, up, down) = 6,144 bf16 tensors of 64×64 (≈50 MB of tensors), saved the
seed's way: {"model": state_dict}.
"""
import argparse
import os

import torch
import torch.distributed.checkpoint as dcp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    sd = {}
    for l in range(a.layers):
        for e in range(a.experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                t = torch.empty((a.dim, a.dim), dtype=torch.float32).uniform_(-0.05, 0.05, generator=g)
                sd[f"model.layers.{l}.mlp.experts.{e}.{proj}.weight"] = t.to(torch.bfloat16)
    dcp.save({"model": sd}, checkpoint_id=a.out, no_dist=True)
    total = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(f"wrote {a.out}: {len(sd)} tensors, {total / 1e9:.3f} GB in {len(os.listdir(a.out))} files")


if __name__ == "__main__":
    main()
