"""The PyTorch way: dcp.load of every tensor into preallocated CPU tensors (single process, no process group)."""
import json
import resource
import sys
import time

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

path = sys.argv[1]
md = FileSystemReader(path).read_metadata()
sd = {}
for k, m in md.state_dict_metadata.items():
    if hasattr(m, "size"):
        sd[k] = torch.empty(m.size, dtype=m.properties.dtype)
nbytes = sum(t.numel() * t.element_size() for t in sd.values())
t0 = time.perf_counter()
dcp.load(sd, checkpoint_id=path)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "bytes": nbytes, "maxRssKb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
