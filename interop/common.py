"""Shared by the interop scripts (any torch 2.3+): the typed JSON encoding the Node tests read
(`Typed` in __test__/helpers.ts) and NeMo-RL's Stateful wrappers (the seed's `native_checkpoint`)."""
import base64

import torch
from torch.distributed.checkpoint.stateful import Stateful


def dtype_name(dt):
    return str(dt).replace("torch.", "")


def raw_uint8(t):
    """The tensor's logical values as a flat uint8 tensor (row-major, little-endian), for every dtype."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def enc(x):
    """Typed JSON encoding of a Python value; tensors nested in values are inlined as hex."""
    if x is None:
        return {"t": "none"}
    if isinstance(x, bool):
        return {"t": "bool", "v": x}
    if isinstance(x, int):
        return {"t": "int", "v": str(int(x))}
    if isinstance(x, float):
        return {"t": "float", "v": float.hex(float(x))}
    if isinstance(x, str):
        return {"t": "str", "v": x}
    if isinstance(x, (bytes, bytearray)):
        return {"t": "bytes", "v": base64.b64encode(bytes(x)).decode("ascii")}
    if isinstance(x, torch.Tensor):
        if type(x).__name__ == "DTensor":
            raise TypeError("a DTensor nested inside a non-tensor value cannot be encoded")
        return {
            "t": "tensor",
            "dtype": dtype_name(x.dtype),
            "shape": list(x.shape),
            "hex": raw_uint8(x).numpy().tobytes().hex() if x.numel() else "",
        }
    if isinstance(x, tuple):
        return {"t": "tuple", "v": [enc(v) for v in x]}
    if isinstance(x, list):
        return {"t": "list", "v": [enc(v) for v in x]}
    if isinstance(x, dict):
        return {"t": "dict", "v": [[enc(k), enc(v)] for k, v in x.items()]}
    raise TypeError(f"cannot encode value of type {type(x).__module__}.{type(x).__qualname__}: {x!r}")


class ModelState(Stateful):
    """NeMo-RL's `native_checkpoint.ModelState`, verbatim in behaviour."""

    def __init__(self, model):
        self.model = model

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(cpu_offload=True))

    def load_state_dict(self, state_dict):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state_dict)


class OptimizerState(Stateful):
    """NeMo-RL's `native_checkpoint.OptimizerState`, verbatim in behaviour."""

    def __init__(self, model, optimizer, scheduler=None):
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        sd = {"optim": get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(cpu_offload=True))}
        if self.scheduler is not None:
            sd["sched"] = self.scheduler.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state_dict["optim"])
        if "sched" in state_dict and self.scheduler is not None:
            self.scheduler.load_state_dict(state_dict["sched"])
