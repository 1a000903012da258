"""A torch-written checkpoint whose `.metadata` is large (many small tensors and optimizer state), for measuring the
unpickler's memory on a real file: `DISTCP_BIG_METADATA=<out>/.metadata cargo test --release -p distcp-core --test
unpickle_memory -- --nocapture` prints its peak heap per byte of pickle.

usage: python bench/lib/make_big_metadata.py <out-dir> [tensors, default 20000]   (20 000: a 5.6 MB .metadata)
"""
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp

warnings.filterwarnings("ignore")
out, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20000
sd = {f"model.layers.{i // 10}.block.{i % 10}.weight": torch.zeros(2, 3) for i in range(n)}
sd["opt"] = {"step": 5, "lr": 1e-3, "betas": (0.9, 0.99), "state": {i: {"exp_avg": torch.zeros(2)} for i in range(n // 4)}}
dcp.save(sd, checkpoint_id=out)
