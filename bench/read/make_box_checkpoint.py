"""Writes the checkpoints bench/read/boxes.mjs times: one plain and one zstd-compressed (torch's ZStandard
extension), each with a 64 MiB float32 tensor `w` [4096, 4096] saved as one chunk.

usage: python bench/read/make_box_checkpoint.py <out-dir>
"""
import os
import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter


def main(out):
    g = torch.Generator().manual_seed(0)
    # half zeros so zstd has something to do, half random so it is not trivial
    w = torch.randn(4096, 4096, generator=g)
    w[::2] = 0
    sd = {"w": w}
    dcp.save(sd, checkpoint_id=os.path.join(out, "plain"))
    from torch.distributed.checkpoint._extension import ZStandard

    dcp.save(sd, storage_writer=FileSystemWriter(os.path.join(out, "zstd"), _extensions=[ZStandard()]))


if __name__ == "__main__":
    main(sys.argv[1])
