"""The torch side of bench/save-load/async.mjs: how long `dcp.async_save` blocks the trainer (the call returns once
the state dict is staged; the write continues on a thread), against a blocking `dcp.save`, on the Llama-shaped
bf16 state dict of bench/lib (same names and shapes as the JS side), and a CPU loop's slowdown while the
async write runs behind it. Prints one JSON object.

usage: python bench/save-load/torch_async.py <work dir> [--layers 8] [--reps 3] [--idle]
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from make_llama_checkpoint import shapes  # noqa: E402

warnings.filterwarnings("ignore")


def fresh(work, name):
    d = os.path.join(work, name)
    shutil.rmtree(d, ignore_errors=True)
    return d


def loop(seconds):
    """The same LCG work units as the JS side's loop, counted per second."""
    t0 = time.perf_counter()
    units = 0
    while time.perf_counter() - t0 < seconds:
        x = 0
        for _ in range(20_000):  # Python is ~100x slower per step than V8: a unit of similar wall time
            x = (x * 1664525 + 1013904223) & 0xFFFFFFFF
        units += 1
    return units / (time.perf_counter() - t0)


def step(sd, idle):
    """A training step's touch of every parameter (one byte per 4 KiB page, as an optimizer step writes them all)
    before each timed save, as in the JS side; `--idle` leaves the tensors untouched between saves."""
    if idle:
        return
    for t in sd.values():
        u = t.view(-1).view(torch.uint8)
        u[::4096].bitwise_xor_(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--idle", action="store_true")
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    sd = {n: torch.randn(s, generator=g, dtype=torch.float32).to(torch.bfloat16) for n, s in shapes(a)}
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())

    dcp.save(sd, checkpoint_id=fresh(a.work, "warmup"), no_dist=True)
    blocking = []
    for _ in range(a.reps):
        d = fresh(a.work, "blocking")
        step(sd, a.idle)
        t0 = time.perf_counter()
        dcp.save(sd, checkpoint_id=d, no_dist=True)
        blocking.append(time.perf_counter() - t0)

    def async_runs(stager_name, make_stager):
        blocked, total = [], []
        for _ in range(a.reps):
            d = fresh(a.work, "async")
            step(sd, a.idle)
            t0 = time.perf_counter()
            r = dcp.async_save(sd, checkpoint_id=d, no_dist=True, async_stager=make_stager())
            t1 = time.perf_counter()
            fut = getattr(r, "upload_completion", r)
            staged = getattr(r, "staging_completion", None)
            if staged is not None:
                staged.result()
                t1 = time.perf_counter()
            fut.result()
            blocked.append(t1 - t0)
            total.append(time.perf_counter() - t0)
        return {"blockedMs": [round(x * 1000, 1) for x in blocked], "commitMs": [round(x * 1000) for x in total]}

    out = {"bytes": nbytes, "reps": a.reps, "torch": torch.__version__, "blockingSaveMs": [round(x * 1000) for x in blocking]}
    # dcp.async_save's default: DefaultStager(StagingOptions()) asks for pinned, shared memory and async staging
    # (pinned memory needs an accelerator); the plain CPU stager copies into ordinary memory
    cpu = lambda: DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False))  # noqa: E731
    out["asyncCpuStager"] = async_runs("cpu", cpu)
    try:
        out["asyncDefaultStager"] = async_runs("default", lambda: DefaultStager(StagingOptions()))
    except Exception as e:  # no accelerator: pinned memory is unavailable
        out["asyncDefaultStager"] = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"

    window = max(1.0, statistics.median(out["asyncCpuStager"]["commitMs"]) / 1000)
    alone = loop(window)
    r = dcp.async_save(sd, checkpoint_id=fresh(a.work, "async-loop"), no_dist=True, async_stager=cpu())
    during = loop(window)
    getattr(r, "upload_completion", r).result()
    after = loop(window)
    out["loopSlowdown"] = round(1 - during / ((alone + after) / 2), 3)
    out["blockedRatio"] = round(statistics.median(out["asyncCpuStager"]["blockedMs"]) / 1000 / statistics.median(blocking), 3)
    shutil.rmtree(a.work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
