"""Writes the GPU bench's checkpoints with torch itself: 3 ranks (spawned processes, gloo over a FileStore), each
holding DTensor shards, saved with torch.distributed.checkpoint.save.

    python3 make_ckpt.py --out DIR --gb 8.6 [--shard1-gb 1] [--ranks 3]

DIR/big     bf16 weights Shard(0) across the ranks (uneven row and column counts on purpose), ≥ --gb GB in all
DIR/shard1  bf16 weights Shard(1) across the ranks

Values are random bit patterns (every bf16 encoding, NaNs included): the bench compares bytes, not numbers.
Generated on the GPU when there is one (fast), else on the CPU. Prints one line per step.
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import warnings


def layout(total_bytes, shard_dim):
    """[(name, shape)] adding up to at least total_bytes of bf16."""
    cols = 8192 if total_bytes >= 1e9 else 1024
    per_tensor = min(256 << 20, max(total_bytes // 8, cols * 2 * 3))
    rows = max(3, per_tensor // (cols * 2))
    out = [("embed.weight", (rows + 1, cols + 1))]  # uneven on both dims
    have = (rows + 1) * (cols + 1) * 2
    i = 0
    while have < total_bytes:
        out.append((f"layers.{i}.weight", (rows, cols)))
        out.append((f"layers.{i}.bias", (cols,) if shard_dim == 0 else (1, cols)))
        have += rows * cols * 2 + cols * 2
        i += 1
    return out


def make_tensor(torch, shape, seed, device):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    x = torch.randint(-32768, 32768, shape, dtype=torch.int16, device=device, generator=g)
    return x.view(torch.bfloat16)


def dtensor_api():
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor, Shard
    return DTensor, Shard


def worker(rank, world, store_path, out, total_bytes, shard1_bytes):
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(max(1, (os.cpu_count() or 3) // world))
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    DTensor, Shard = dtensor_api()
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, total, dim in (("big", total_bytes, 0), ("shard1", shard1_bytes, 1)):
        t0 = time.time()
        sd = {}
        for i, (key, shape) in enumerate(layout(total, dim)):
            full = make_tensor(torch, shape, 1000 * dim + i, gen_device)
            d = min(dim, len(shape) - 1)
            pieces = full.chunk(world, d)
            local = pieces[rank] if rank < len(pieces) else full.narrow(d, 0, 0)
            local = local.to("cpu").contiguous()
            sd[key] = DTensor.from_local(
                local, mesh, [Shard(d)], run_check=False, shape=full.shape, stride=full.stride()
            )
            del full
        t1 = time.time()
        dcp.save(sd, checkpoint_id=os.path.join(out, name))
        dist.barrier()
        if rank == 0:
            nbytes = sum(math.prod(s) * 2 for _, s in layout(total, dim))
            print(
                f"make_ckpt: {name}: {len(sd)} tensors, {nbytes / 1e9:.2f} GB, {world} ranks "
                f"(generate {t1 - t0:.1f} s on {gen_device}, dcp.save {time.time() - t1:.1f} s)",
                flush=True,
            )
        del sd
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo teardown can hang; spawn only looks at the exit code


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--gb", type=float, default=8.6)
    ap.add_argument("--shard1-gb", type=float, default=None)
    ap.add_argument("--ranks", type=int, default=3)
    a = ap.parse_args()
    import torch
    import torch.multiprocessing as mp

    print(f"make_ckpt: torch {torch.__version__}, cuda {torch.cuda.is_available()}, out {a.out}", flush=True)
    shard1 = a.shard1_gb if a.shard1_gb is not None else max(0.01, a.gb / 8)
    for name in ("big", "shard1"):
        shutil.rmtree(os.path.join(a.out, name), ignore_errors=True)
    os.makedirs(a.out, exist_ok=True)
    store = tempfile.NamedTemporaryFile(prefix="distcp-store-", delete=False).name
    os.unlink(store)
    mp.start_processes(
        worker,
        args=(a.ranks, store, a.out, int(a.gb * 1e9), int(shard1 * 1e9)),
        nprocs=a.ranks,
        start_method="spawn",
    )
    for name in ("big", "shard1"):
        if not os.path.isfile(os.path.join(a.out, name, ".metadata")):
            sys.exit(f"make_ckpt: {name} has no .metadata")


if __name__ == "__main__":
    main()
