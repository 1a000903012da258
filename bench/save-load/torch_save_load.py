"""The PyTorch way: dcp.save of the same bf16 Llama-shaped state dict ({"model": ...}), or dcp.load into
preallocated tensors (load-touched: tensors written before timing, as a model's parameters are).
usage: python bench/save-load/torch_save_load.py <dir> save|load|load-touched"""
import json
import sys
import time

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, "bench/lib")
from make_llama_checkpoint import shapes  # noqa: E402


class A:
    layers, hidden, intermediate, vocab = 8, 2048, 5632, 32000


path, mode = sys.argv[1], sys.argv[2]
model = {}
for name, shape in shapes(A):
    t = torch.empty(shape, dtype=torch.bfloat16)
    if mode == "save":
        t.view(torch.int16).random_()
    elif mode == "load-touched":
        t.fill_(1)
    model[name] = t
nbytes = sum(t.numel() * t.element_size() for t in model.values())
t0 = time.perf_counter()
if mode == "save":
    dcp.save({"model": model}, checkpoint_id=path)
else:
    dcp.load({"model": model}, checkpoint_id=path)  # load and load-touched
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": nbytes}))
