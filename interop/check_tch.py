"""Loads a checkpoint that `crates/distcp-tch` saved with torch's own `dcp.load`, and compares every tensor bit for bit
with the bytes the Rust test exported. Run by the crate's tests with the torch 2.13 venv (`.venv-tch`).

usage: python interop/check_tch.py <ckpt> <expected-dir> [--seed-model]

<expected-dir> holds what the Rust side wrote, in the fixtures' format (fixtures/README.md):
  expected.json         {"tensors": {flat key: {"dtype": "<torch dtype name>", "shape": [...]}}}
  expected.safetensors  every tensor's raw bytes as a 1-D uint8 tensor under its flat key

Every flat key is `model.<name>`: the state dict handed to `dcp.load` is `{"model": {name: torch.empty(...)}}`.
With --seed-model the checkpoint is also loaded the way NeMo-RL loads it, `dcp.load({"model": ModelState(m)})`,
into `Sequential(Linear(4, 8), LayerNorm(8), ReLU(), Linear(8, 2))`, and the model's parameters are compared.
Prints one `check_tch: ok ...` line, or raises.
"""
import json
import logging
import os
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ModelState, raw_uint8  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger().setLevel(logging.ERROR)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        sys.exit(__doc__)
    ckpt, expected_dir = args
    seed_model = "--seed-model" in sys.argv
    with open(os.path.join(expected_dir, "expected.json")) as f:
        tensors = json.load(f)["tensors"]
    raw = load_file(os.path.join(expected_dir, "expected.safetensors"))

    model = {}
    for key, t in tensors.items():
        prefix, name = key.split(".", 1)
        assert prefix == "model", f"{key}: not under `model.`"
        model[name] = torch.empty(t["shape"], dtype=getattr(torch, t["dtype"]))
    dcp.load({"model": model}, checkpoint_id=ckpt)
    for name, value in model.items():
        key = f"model.{name}"
        want = tensors[key]
        assert str(value.dtype) == f"torch.{want['dtype']}" and list(value.shape) == want["shape"], key
        assert torch.equal(raw_uint8(value), raw[key]), f"{key}: bytes differ from what tch saved"
    checked = len(model)

    if seed_model:
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        dcp.load({"model": ModelState(m)}, checkpoint_id=ckpt)
        sd = m.state_dict()
        assert sorted(f"model.{k}" for k in sd) == sorted(tensors), "the seed model's keys differ from the saved ones"
        for name, value in sd.items():
            assert torch.equal(raw_uint8(value), raw[f"model.{name}"]), f"ModelState: {name} differs"
        checked += len(sd)
    print(f"check_tch: ok, {checked} tensors equal bit for bit (torch {torch.__version__})")


if __name__ == "__main__":
    main()
