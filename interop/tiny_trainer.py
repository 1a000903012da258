"""The PyTorch side of the tiny-trainer round trips (examples/tiny-trainer, __test__/checkpointing.spec.ts).

The same run as the TypeScript trainer: Sequential(Linear(4,8), LayerNorm(8), ReLU(), Linear(8,2)), MSE loss,
AdamW (or Adam) and StepLR, on batches drawn from the same 32-bit LCG (examples/tiny-trainer/data.ts), checkpointed
the NeMo-RL seed's way (ModelState / OptimizerState with get_model_state_dict / get_optimizer_state_dict,
cpu_offload=True; dcp.save / dcp.load).

usage:
  python interop/tiny_trainer.py torch-train  --out DIR --steps N [--optimizer adamw|adam] [--seed S]
      trains N steps, saves DIR/weights and DIR/optimizer, writes DIR/torch-train.json: the saved state (typed),
      the losses, and for the next step (batch N): its loss, the gradients, the parameters and optimizer state after
      optimizer.step(), and the loss on batch N+1 after optimizer.step() + scheduler.step().
  python interop/tiny_trainer.py torch-resume --dir DIR --steps N [--optimizer adamw|adam] [--tokenizer]
      builds a fresh model/optimizer/scheduler (other init), loads DIR/weights and DIR/optimizer with the seed's
      load_checkpoint, writes DIR/torch-resume.json: what torch loaded (typed) and the same next-step numbers.

Typed values are the fixtures' encoding (fixtures/README.md): floats as float.hex, tensors as raw hex.
"""
import argparse
import json
import os
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful  # noqa: F401

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ModelState, OptimizerState, enc  # noqa: E402

warnings.filterwarnings("ignore")

DATA_SEED = 7
BATCH = 3
LR = 1e-2
WEIGHT_DECAY = 1e-2
STEP_SIZE = 4
GAMMA = 0.5


# ---------------------------------------------------------------------------------------------------------------
# the seed (NeMo-RL nemo_rl/utils/native_checkpoint.py), verbatim in behaviour


def save_checkpoint(model, weights_path, optimizer=None, scheduler=None, optimizer_path=None):
    dcp.save({"model": ModelState(model)}, checkpoint_id=weights_path)
    if optimizer is not None:
        if optimizer_path is None:
            raise ValueError("optimizer_path must be provided when saving optimizer state")
        dcp.save({"optim": OptimizerState(model, optimizer, scheduler)}, checkpoint_id=optimizer_path)


def load_checkpoint(model, weights_path, optimizer=None, scheduler=None, optimizer_path=None):
    dcp.load(state_dict={"model": ModelState(model)}, checkpoint_id=weights_path)
    if optimizer is not None:
        if optimizer_path is None:
            raise ValueError("optimizer_path must be provided when loading optimizer state")
        dcp.load(state_dict={"optim": OptimizerState(model, optimizer, scheduler)}, checkpoint_id=optimizer_path)


# ---------------------------------------------------------------------------------------------------------------
# data: the LCG of examples/tiny-trainer/data.ts


def uniform(seed, index, n):
    s = (seed * 2654435761 + index * 40503 + 12345) & 0xFFFFFFFF
    out = []
    for _ in range(n):
        s = (s * 1664525 + 1013904223) & 0xFFFFFFFF
        out.append((s >> 8) / 2**23 - 1)
    return torch.tensor(out, dtype=torch.float32)


def make_batch(step, in_features=4, out_features=2):
    v = uniform(DATA_SEED, 1000 + step, BATCH * (in_features + out_features))
    return v[: BATCH * in_features].reshape(BATCH, in_features), v[BATCH * in_features :].reshape(BATCH, out_features)


def build(seed, optimizer):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=LR)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=STEP_SIZE, gamma=GAMMA)
    return model, opt, sched


def loss_on(model, step):
    x, y = make_batch(step)
    return torch.nn.functional.mse_loss(model(x), y)


def train_step(model, opt, sched, step):
    loss = loss_on(model, step)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


# ---------------------------------------------------------------------------------------------------------------
# typed encoding (fixtures/README.md)


def hexes(tensors):
    return {k: enc(v) for k, v in tensors.items()}


def next_step(model, opt, sched, step):
    """The numbers of training step `step` (batch `step`), then the loss on batch step+1."""
    loss = loss_on(model, step)
    opt.zero_grad()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    params_after = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim_after = OptimizerState(model, opt).state_dict()["optim"]
    sched.step()
    with torch.no_grad():
        loss_after = loss_on(model, step + 1).item()
    return {
        "loss": float.hex(loss.item()),
        "grads": hexes(grads),
        "params_after": hexes(params_after),
        "optim_after": enc(optim_after),
        "loss_after": float.hex(loss_after),
        "lr_after": float.hex(opt.param_groups[0]["lr"]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["torch-train", "torch-resume"])
    ap.add_argument("--out")
    ap.add_argument("--dir")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--optimizer", choices=["adamw", "adam"], default="adamw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", action="store_true", help="also load DIR/tokenizer with transformers")
    a = ap.parse_args()
    torch.set_num_threads(1)

    if a.command == "torch-train":
        model, opt, sched = build(a.seed, a.optimizer)
        losses = [train_step(model, opt, sched, s) for s in range(a.steps)]
        save_checkpoint(model, os.path.join(a.out, "weights"), opt, sched, os.path.join(a.out, "optimizer"))
        saved = {
            "model": enc(ModelState(model).state_dict()),
            "optim": enc(OptimizerState(model, opt, sched).state_dict()),
            "optimizer_raw": enc(opt.state_dict()),
        }
        out = {
            "torch_version": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "losses": [float.hex(x) for x in losses],
            **saved,
        }
        out["next"] = next_step(model, opt, sched, a.steps)
        with open(os.path.join(a.out, "torch-train.json"), "w") as f:
            json.dump(out, f)
    else:
        model, opt, sched = build(a.seed + 1000, a.optimizer)
        load_checkpoint(model, os.path.join(a.dir, "weights"), opt, sched, os.path.join(a.dir, "optimizer"))
        out = {
            "torch_version": torch.__version__,
            "model": enc(ModelState(model).state_dict()),
            "optim": enc(OptimizerState(model, opt, sched).state_dict()),
            "optimizer_raw": enc(opt.state_dict()),
            "sched": enc(sched.state_dict()),
        }
        if a.tokenizer:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(os.path.join(a.dir, "tokenizer"))
            out["tokenizer"] = {"class": type(tok).__name__, "ids": tok("hello world")["input_ids"]}
        out["next"] = next_step(model, opt, sched, a.steps)
        with open(os.path.join(a.dir, "torch-resume.json"), "w") as f:
            json.dump(out, f)
        n = out["next"]
        print(f"torch {torch.__version__} loaded {a.dir}: step {a.steps} loss {float.fromhex(n['loss'])}, "
              f"then loss {float.fromhex(n['loss_after'])} on batch {a.steps + 1}")
        return 0
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
