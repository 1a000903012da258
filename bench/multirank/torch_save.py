"""torch's side of bench/multirank/save-bench.ts: one gloo rank under torchrun holds its dim-0 shard of every tensor of
the Llama-shaped state dict in shapes.json (as DTensors, Shard(0), built from the local shard only) and times
two dcp.saves of it, each after a barrier. Prints {"rank", "save", "seconds", "maxRssKb", "bytes"} per save.
usage: torchrun --nproc-per-node 4 bench/multirank/torch_save.py <dir>"""
import json
import os
import resource
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "shapes.json")) as f:
    cfg = json.load(f)


def shapes():
    v, h, i = cfg["vocab"], cfg["hidden"], cfg["intermediate"]
    out = [("model.embed_tokens.weight", (v, h))]
    for l in range(cfg["layers"]):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (h,))]
        out += [(p + f"self_attn.{n}_proj.weight", (h, h)) for n in "qkvo"]
        out += [(p + "post_attention_layernorm.weight", (h,))]
        out += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mesh = init_device_mesh("cpu", (world,))
local = [(n, (s[0] // world,) + tuple(s[1:]), s) for n, s in shapes()]
total = sum(torch.Size(ls).numel() for _, ls, _ in local)
flat = torch.empty(total, dtype=torch.bfloat16)
flat.view(torch.int16).random_()
sd, at = {}, 0
for name, ls, gs in local:
    n = torch.Size(ls).numel()
    sd[name] = DTensor.from_local(flat[at : at + n].view(ls), mesh, [Shard(0)], run_check=False, shape=torch.Size(gs), stride=torch.empty(gs, device="meta").stride())
    at += n
# save 1 is the process's first, save 2 a later one (as bench/multirank/save.ts); save 1's folder goes before save 2
for n in (1, 2):
    dist.barrier()
    t0 = time.perf_counter()
    dcp.save({"model": sd}, checkpoint_id=os.path.join(sys.argv[1], f"s{n}"))
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rank": rank, "save": n, "seconds": seconds, "maxRssKb": rss, "bytes": total * 2}), flush=True)
    dist.barrier()
    if n == 1 and rank == 0:
        shutil.rmtree(os.path.join(sys.argv[1], "s1"))
sys.stdout.flush()
os._exit(0)
