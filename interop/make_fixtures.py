"""Writes small DCP checkpoints with PyTorch itself, plus the values a reader must find in them.

usage: python interop/make_fixtures.py --out <dir> [--only name1,name2] [--seed N] [--no-verify] [--list]

For every fixture <name> this writes
  <dir>/<name>/ckpt/                 the checkpoint folder, written by torch.distributed.checkpoint.save
  <dir>/<name>/expected.json         {"torch_version", "python_version", "world_size", "tensors", "objects", "tree"}
  <dir>/<name>/expected.safetensors  the full (global) tensor of every tensor key, as raw bytes: a 1-D uint8 tensor
                                     t.detach().contiguous().reshape(-1).view(torch.uint8), stored under the flat key

Flat keys are read back from the written metadata (torch's own keys). Non-tensor items and the whole nested state
dict use a typed JSON encoding (see `enc`). After writing, every fixture is loaded back with `dcp.load` into a fresh
state dict of the same structure and compared with the saved values (skip with --no-verify).

Runs on torch 2.3 ... newest, CPU only. Multi-rank fixtures are spawned with torch.multiprocessing and the gloo
backend on 127.0.0.1. A fixture that this torch version cannot make is skipped with a printed reason and no folder.
"""
import argparse
import base64
import collections.abc
import inspect
import json
import logging
import os
import platform
import shutil
import socket
import sys
import time
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ModelState, OptimizerState, dtype_name, enc  # noqa: E402
from common import raw_uint8 as raw_bytes  # noqa: E402

try:
    from torch.distributed.checkpoint.stateful import Stateful
except ImportError:  # pragma: no cover - very old torch
    Stateful = object

warnings.filterwarnings("ignore")
# dcp.load logs a traceback at WARNING when it falls back from .metadata to a rank-local __{rank}.metadata
logging.getLogger().setLevel(logging.ERROR)  # torch.distributed.checkpoint logs to the root logger

TORCH_VERSION = torch.__version__.split("+")[0]
TV = tuple(int(x) for x in TORCH_VERSION.split(".")[:2])


class Skip(Exception):
    """Raised by a fixture (on every rank) when this torch version cannot make it."""


# ----------------------------------------------------------------------------------------------------------------
# torch feature probes


def dtensor_api():
    """(distribute_tensor, Shard, Replicate, DeviceMesh, DTensor) from torch.distributed.tensor or ._tensor."""
    try:
        import torch.distributed.tensor as T

        if hasattr(T, "distribute_tensor"):
            return T.distribute_tensor, T.Shard, T.Replicate, T.DeviceMesh, T.DTensor
    except ImportError:
        pass
    import torch.distributed._tensor as T

    return T.distribute_tensor, T.Shard, T.Replicate, T.DeviceMesh, T.DTensor


def is_dtensor(x):
    return isinstance(x, torch.Tensor) and type(x).__name__ == "DTensor"


def fully_shard_fn():
    try:
        from torch.distributed.fsdp import fully_shard

        return fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard

        return fully_shard


def zstd_extension():
    """The ZStandard extension class, or a reason string why it cannot be used."""
    if "_extensions" not in inspect.signature(FileSystemWriter.__init__).parameters:
        return None, "FileSystemWriter has no _extensions parameter in this torch version"
    try:
        from torch.distributed.checkpoint._extension import ZStandard
    except ImportError as e:
        return None, f"torch.distributed.checkpoint._extension.ZStandard missing: {e}"
    if not ZStandard.is_available():
        return None, "neither the zstandard nor the pyzstd package is installed in this environment"
    return ZStandard, None


def rank_local_reason():
    if "use_collectives" not in inspect.signature(dcp.save).parameters:
        return "dcp.save has no use_collectives parameter (rank-local __{rank}.metadata) in this torch version"
    return None


def skip_if_old_for_fsdp2():
    if TV < (2, 15):
        return "FSDP2 fixture is made with the newest torch only (2.15)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# typed encoding


def get_element(tree, path):
    cur = tree
    for p in path:
        cur = cur[p] if not isinstance(cur, collections.abc.Mapping) else _dict_get(cur, p)
    return cur


def _dict_get(d, p):
    if p in d:
        return d[p]
    for k, v in d.items():  # torch keys paths by str(key)
        if str(k) == p:
            return v
    raise KeyError(p)


def enc_tree(v, path, inv, tensor_keys):
    """Encodes the state dict as dcp.save saw it: every item stored under a flat key is a leaf."""
    if path in inv:
        key = inv[path]
        if key in tensor_keys:
            assert isinstance(v, torch.Tensor), (key, type(v))
            return {"t": "tensor", "key": key}
        assert not isinstance(v, torch.Tensor), key
        return enc(v)
    if isinstance(v, collections.abc.Mapping):
        return {"t": "dict", "v": [[enc(k), enc_tree(x, path + (str(k),), inv, tensor_keys)] for k, x in v.items()]}
    if isinstance(v, list):
        return {"t": "list", "v": [enc_tree(x, path + (i,), inv, tensor_keys) for i, x in enumerate(v)]}
    raise AssertionError(f"value at path {path} ({type(v).__name__}) has no flat key in the checkpoint")


UNSET = "__distcp_unset__"


def make_template(v, path, inv):
    """A fresh state dict of the same structure: tensors zeroed, every non-tensor item replaced by a marker."""
    if path in inv:
        if isinstance(v, torch.Tensor):
            return torch.zeros_like(v)
        return UNSET
    if isinstance(v, collections.abc.Mapping):
        return {k: make_template(x, path + (str(k),), inv) for k, x in v.items()}
    if isinstance(v, list):
        return [make_template(x, path + (i,), inv) for i, x in enumerate(v)]
    raise AssertionError(path)


# ----------------------------------------------------------------------------------------------------------------
# saving, recording, verifying


class Ctx:
    def __init__(self, name, rank, world_size, fixture_dir, seed, verify):
        self.name = name
        self.rank = rank
        self.world_size = world_size
        self.fixture_dir = fixture_dir
        self.ckpt = os.path.join(fixture_dir, "ckpt")
        self.seed = seed
        self.verify = verify
        self.gen = torch.Generator().manual_seed(seed)

    # random helpers (same values on every rank: every rank draws the same sequence)
    def randn(self, *shape, dtype=torch.float32):
        return torch.randn(*shape, generator=self.gen, dtype=dtype)

    def randint(self, lo, hi, shape, dtype):
        return torch.randint(lo, hi, shape, generator=self.gen, dtype=dtype)

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()


def read_metadata(ckpt, metadata_rank=None):
    reader = FileSystemReader(ckpt)
    if metadata_rank is None:
        return reader.read_metadata()
    return reader.read_metadata(rank=metadata_rank)


def save_and_record(ctx, state_dict, tree=None, writer_kwargs=None, save_kwargs=None, metadata_rank=None):
    """dcp.save(state_dict) on every rank; rank 0 then writes expected.json/.safetensors; then verify by dcp.load.

    tree: the state dict after Stateful.state_dict() was applied (defaults to state_dict).
    """
    if tree is None:
        tree = state_dict
    save_kwargs = dict(save_kwargs or {})
    if writer_kwargs is not None:
        dcp.save(state_dict, storage_writer=FileSystemWriter(ctx.ckpt, **writer_kwargs), **save_kwargs)
    else:
        dcp.save(state_dict, checkpoint_id=ctx.ckpt, **save_kwargs)
    ctx.barrier()

    md = read_metadata(ctx.ckpt, metadata_rank)
    sdm = md.state_dict_metadata
    planner_data = md.planner_data
    assert isinstance(planner_data, dict), "planner_data missing"
    assert set(planner_data) == set(sdm), "planner_data keys differ from state_dict_metadata keys"
    inv = {tuple(p): k for k, p in planner_data.items()}
    assert len(inv) == len(planner_data)

    # cross-check with torch's flatten function (the same one DefaultSavePlanner uses)
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, mapping = flatten_state_dict(tree)
    assert set(flat) == set(sdm), (sorted(set(flat) ^ set(sdm)))
    assert {k: tuple(v) for k, v in mapping.items()} == {k: tuple(v) for k, v in planner_data.items()}

    tensor_keys = [k for k in sorted(sdm) if isinstance(sdm[k], TensorStorageMetadata)]
    object_keys = [k for k in sorted(sdm) if isinstance(sdm[k], BytesStorageMetadata)]
    assert len(tensor_keys) + len(object_keys) == len(sdm)

    # full tensors (DTensor.full_tensor() is a collective: every rank walks the same sorted key list)
    full = {}
    for k in tensor_keys:
        v = get_element(tree, planner_data[k])
        assert isinstance(v, torch.Tensor), k
        t = v.full_tensor() if is_dtensor(v) else v
        t = t.detach().cpu()
        meta = sdm[k]
        assert tuple(meta.size) == tuple(t.shape), (k, meta.size, t.shape)
        assert meta.properties.dtype == t.dtype, (k, meta.properties.dtype, t.dtype)
        full[k] = t

    if ctx.rank == 0:
        from safetensors.torch import save_file

        expected = {
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "world_size": ctx.world_size,
            "tensors": {k: {"dtype": dtype_name(full[k].dtype), "shape": list(full[k].shape)} for k in tensor_keys},
            "objects": {k: enc(get_element(tree, planner_data[k])) for k in object_keys},
            "tree": enc_tree(tree, (), inv, set(tensor_keys)),
        }
        with open(os.path.join(ctx.fixture_dir, "expected.json"), "w", encoding="utf-8") as f:
            json.dump(expected, f, indent=1, ensure_ascii=False)
            f.write("\n")
        save_file({k: raw_bytes(full[k]) for k in tensor_keys}, os.path.join(ctx.fixture_dir, "expected.safetensors"))
        # self-check of the bytes file
        from safetensors.torch import load_file

        back = load_file(os.path.join(ctx.fixture_dir, "expected.safetensors"))
        for k in tensor_keys:
            assert back[k].dtype == torch.uint8 and back[k].dim() == 1
            assert back[k].numel() == full[k].numel() * full[k].element_size(), k
            assert torch.equal(back[k], raw_bytes(full[k])), k
    ctx.barrier()

    if ctx.verify:
        verify_load(ctx, tree, inv, planner_data, tensor_keys, object_keys, full)
    return md


class _Holder(Stateful):
    """Wraps one top-level entry of the load target.

    torch 2.3's dcp.load rebuilds nested containers internally (_init_state_dict uses tree_map_only), so the
    non-tensor values it loads never reach a plain nested dict passed in; only Stateful.load_state_dict sees them.
    """

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, value):
        self.value = value


def verify_load(ctx, tree, inv, planner_data, tensor_keys, object_keys, full):
    holders = {k: _Holder(v) for k, v in make_template(tree, (), inv).items()}
    dcp.load(holders, checkpoint_id=ctx.ckpt)
    template = {k: h.value for k, h in holders.items()}
    for k in tensor_keys:
        v = get_element(template, planner_data[k])
        t = v.full_tensor() if is_dtensor(v) else v
        t = t.detach().cpu()
        assert t.dtype == full[k].dtype and t.shape == full[k].shape, k
        assert torch.equal(raw_bytes(t), raw_bytes(full[k])), f"{ctx.name}: tensor {k} differs after dcp.load"
    for k in object_keys:
        got = get_element(template, planner_data[k])
        want = get_element(tree, planner_data[k])
        assert enc(got) == enc(want), f"{ctx.name}: object {k} differs after dcp.load: {got!r} != {want!r}"
    ctx.barrier()


# ----------------------------------------------------------------------------------------------------------------
# fixtures


def fx_dtypes(ctx):
    r = ctx.randn
    f8src = r(2, 3) * 4
    i64 = ctx.randint(-(2**40), 2**40, (2, 3), torch.int64)
    i64[0, 0] = -(2**63)
    i64[0, 1] = 2**63 - 1
    big = r(4, 3)
    sd = {
        "dtypes": {
            "float64": r(2, 3, dtype=torch.float64),
            "float32": r(2, 3),
            "float16": r(2, 3).to(torch.float16),
            "bfloat16": r(2, 3).to(torch.bfloat16),
            "float8_e4m3fn": f8src.to(torch.float8_e4m3fn),
            "float8_e5m2": (r(2, 3) * 4).to(torch.float8_e5m2),
            "int8": ctx.randint(-128, 128, (2, 3), torch.int8),
            "int16": ctx.randint(-(2**15), 2**15, (2, 3), torch.int16),
            "int32": ctx.randint(-(2**31), 2**31, (2, 3), torch.int32),
            "int64": i64,
            "uint8": ctx.randint(0, 256, (2, 3), torch.uint8),
            "bool": ctx.randint(0, 2, (2, 3), torch.int64).bool(),
            "complex64": torch.complex(r(2, 3), r(2, 3)),
        },
        "scalar_f32": r(()),
        "scalar_i64": ctx.randint(-1000, 1000, (), torch.int64),
        "empty": torch.empty((0, 3), dtype=torch.float32),
        "noncontig": {
            "transposed": r(3, 4).t(),
            "permuted": r(2, 3, 4).permute(2, 0, 1),
            "sliced": big[1:3],
        },
        "nested": {
            "l1": {"l2": {"l3": r(2), "n": 3}, "w": r(1, 2)},
            "list": [r(2), r(3), {"x": r(1)}, "s"],
            "a.b": r(2),
            "int_keys": {0: r(1), 7: "seven"},
        },
        "objects": {
            "none": None,
            "true": True,
            "false": False,
            "zero": 0,
            "neg": -5,
            "big": 2**70,
            "min_i64": -(2**63),
            "f01": 0.1,
            "f1": 1.0,
            "inf": float("inf"),
            "nan": float("nan"),
            "negzero": -0.0,
            "str": "héllo ✓",
            "bytes": b"\x00\xffbytes",
            "list": [1, 2, 3],
            "tuple": (1, "a", 2.5),
            "dict": {"a": 1, "b": [0.5]},
            "empty_list": [],
            "empty_dict": {},
        },
        "tuple_with_tensor": (r(2), "t", 3),
    }
    assert not sd["noncontig"]["transposed"].is_contiguous()
    assert not sd["noncontig"]["permuted"].is_contiguous()
    assert sd["noncontig"]["sliced"].storage_offset() == 3
    save_and_record(ctx, sd)


def _torch_save_roundtrips(t):
    import io

    try:
        buf = io.BytesIO()
        torch.save(t, buf)
        buf.seek(0)
        back = torch.load(buf)
        return back.dtype == t.dtype and torch.equal(raw_bytes(back), raw_bytes(t))
    except Exception:
        return False


def fx_dtypes_extra(ctx):
    """Opt-in (not in the default set): dtypes beyond the common list, where this torch version can save them."""
    cand = {}
    for name in ["uint16", "uint32", "uint64"]:
        dt = getattr(torch, name, None)
        if dt is not None:
            cand[name] = ctx.randint(0, 2**15, (2, 3), torch.int64).to(dt)
    for name in ["float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"]:
        dt = getattr(torch, name, None)
        if dt is not None:
            cand[name] = ctx.randn(2, 3).abs().add(0.1).to(dt)
    cand["complex128"] = torch.complex(ctx.randn(2, dtype=torch.float64), ctx.randn(2, dtype=torch.float64))
    cand["complex32"] = torch.complex(ctx.randn(2), ctx.randn(2)).to(torch.complex32)
    sd = {k: v for k, v in cand.items() if _torch_save_roundtrips(v)}
    dropped = sorted(set(cand) - set(sd))
    if dropped:
        print(f"     dtypes-extra: torch.save cannot round-trip {', '.join(dropped)} in this version; left out")
    save_and_record(ctx, sd)


def seed_experiment(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.2)
    return model, opt, sched


def seed_trained(ctx):
    model, opt, sched = seed_experiment(ctx.seed)
    for _ in range(5):
        x = ctx.randn(3, 4)
        y = ctx.randn(3, 2)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def fx_seed_model(ctx):
    model, opt, sched = seed_trained(ctx)
    state = ModelState(model)
    save_and_record(ctx, {"model": state}, tree={"model": state.state_dict()})
    if ctx.verify:  # the seed's own load path into a fresh model
        m2, _, _ = seed_experiment(ctx.seed + 1)
        dcp.load({"model": ModelState(m2)}, checkpoint_id=ctx.ckpt)
        assert enc(dict(m2.state_dict())) == enc(dict(model.state_dict())), "seed-model: ModelState round trip"


def fx_seed_optim(ctx):
    model, opt, sched = seed_trained(ctx)
    state = OptimizerState(model, opt, sched)
    save_and_record(ctx, {"optim": state}, tree={"optim": state.state_dict()})
    if ctx.verify:  # the seed's own load path into a fresh model/optimizer/scheduler
        m2, o2, s2 = seed_experiment(ctx.seed + 1)
        m2.load_state_dict(model.state_dict())
        st2 = OptimizerState(m2, o2, s2)
        dcp.load({"optim": st2}, checkpoint_id=ctx.ckpt)
        assert enc(st2.state_dict()) == enc(state.state_dict()), "seed-optim: OptimizerState round trip"


def fx_dtensor_2rank(ctx):
    distribute_tensor, Shard, Replicate, DeviceMesh, _ = dtensor_api()
    mesh = DeviceMesh("cpu", list(range(ctx.world_size)))
    r = ctx.randn
    sd = {
        "shard0": distribute_tensor(r(6, 4), mesh, [Shard(0)]),
        "shard1": distribute_tensor(r(3, 8), mesh, [Shard(1)]),
        "replicate": distribute_tensor(r(5), mesh, [Replicate()]),
        "uneven": distribute_tensor(r(5, 3), mesh, [Shard(0)]),
        "tiny": distribute_tensor(r(1, 3), mesh, [Shard(0)]),  # rank 1 holds an empty shard
        "plain": r(2, 2),
        "step": 7,
        "info": {"name": "dtensor", "lr": 0.25},
    }
    save_and_record(ctx, sd)


def fx_dtensor_4rank(ctx):
    distribute_tensor, Shard, Replicate, DeviceMesh, _ = dtensor_api()
    ranks = list(range(ctx.world_size))
    mesh2 = DeviceMesh("cpu", torch.tensor(ranks).reshape(2, 2))
    mesh1 = DeviceMesh("cpu", ranks)
    r = ctx.randn
    sd = {
        "s0_s1": distribute_tensor(r(4, 6), mesh2, [Shard(0), Shard(1)]),
        "r_s0": distribute_tensor(r(8, 3), mesh2, [Replicate(), Shard(0)]),
        "s1_r": distribute_tensor(r(2, 4), mesh2, [Shard(1), Replicate()]),
        "uneven_4": distribute_tensor(r(3, 2), mesh1, [Shard(0)]),  # 1,1,1,0 rows: rank 3 is empty
        "step": 3,
    }
    save_and_record(ctx, sd)


def fx_fsdp2_2rank(ctx):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = fully_shard_fn()
    torch.manual_seed(ctx.seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    mesh = init_device_mesh("cpu", (ctx.world_size,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = ctx.randn(5, 4)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    assert any(is_dtensor(v) for v in sd["model"].values()), "fully_shard did not produce DTensors"
    save_and_record(ctx, sd)


def fx_zstd(ctx):
    ZStandard, reason = zstd_extension()
    if reason:
        raise Skip(reason)
    sd = {
        "w": ctx.randn(4, 5),
        "ids": ctx.randint(0, 100, (6,), torch.int64),
        "zeros": torch.zeros(64, dtype=torch.float32),  # compresses well
        "meta": {"epoch": 2, "tag": "zstd"},
    }
    save_and_record(ctx, sd, writer_kwargs={"_extensions": [ZStandard()]})


def fx_rank_local(ctx):
    reason = rank_local_reason()
    if reason:
        raise Skip(reason)
    sd = {"w": ctx.randn(3, 2)}
    save_and_record(ctx, sd, save_kwargs={"use_collectives": False, "no_dist": True}, metadata_rank=0)
    if os.path.exists(os.path.join(ctx.ckpt, ".metadata")) or not os.path.exists(
        os.path.join(ctx.ckpt, "__0.metadata")
    ):
        raise AssertionError("rank-local save did not write __0.metadata (only)")


def multi_file_state(ctx):
    return {
        "a": ctx.randn(8, 4),
        "b": ctx.randn(3),
        "c": ctx.randint(0, 10, (5, 2), torch.int32),
        "d": ctx.randn(2, 2).to(torch.bfloat16),
        "n": 11,
        "s": "multi",
        "f": [0.5, 1.5],
    }


def fx_multi_thread(ctx):
    save_and_record(ctx, multi_file_state(ctx), writer_kwargs={"thread_count": 2})


def fx_file_per_item(ctx):
    save_and_record(ctx, multi_file_state(ctx), writer_kwargs={"single_file_per_rank": False})


# name -> (world_size, function, skip-reason probe, failure becomes a skip)
FIXTURES = {
    "dtypes": (1, fx_dtypes, lambda: None, False),
    "seed-model": (1, fx_seed_model, lambda: None, False),
    "seed-optim": (1, fx_seed_optim, lambda: None, False),
    "dtensor-2rank": (2, fx_dtensor_2rank, lambda: None, False),
    "dtensor-4rank": (4, fx_dtensor_4rank, lambda: None, True),
    "fsdp2-2rank": (2, fx_fsdp2_2rank, skip_if_old_for_fsdp2, True),
    "zstd": (1, fx_zstd, lambda: zstd_extension()[1], False),
    "rank-local": (1, fx_rank_local, rank_local_reason, False),
    "multi-thread": (1, fx_multi_thread, lambda: None, False),
    "file-per-item": (1, fx_file_per_item, lambda: None, False),
}
OPT_IN = {
    "dtypes-extra": (1, fx_dtypes_extra, lambda: None, False),
}
ALL = {**FIXTURES, **OPT_IN}


# ----------------------------------------------------------------------------------------------------------------
# driver


SPAWN_TIMEOUT_S = 300


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, name, world_size, fixture_dir, seed, verify, port):
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    ALL[name][1](Ctx(name, rank, world_size, fixture_dir, seed, verify))
    dist.barrier()
    # dist.destroy_process_group() intermittently hangs with gloo on torch 2.3 (one rank stays in it forever after
    # its peer has exited), so end the worker right here; spawn only looks at the exit code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_fixture(name, out, seed, verify):
    world_size, fn, probe, may_fail = ALL[name]
    fixture_dir = os.path.join(out, name)
    shutil.rmtree(fixture_dir, ignore_errors=True)
    reason = probe()
    if reason:
        return reason
    os.makedirs(fixture_dir)
    try:
        if world_size == 1:
            fn(Ctx(name, 0, 1, fixture_dir, seed, verify))
        else:
            import torch.multiprocessing as mp

            os.environ.setdefault("OMP_NUM_THREADS", "1")
            pctx = mp.start_processes(
                _worker,
                args=(name, world_size, fixture_dir, seed, verify, free_port()),
                nprocs=world_size,
                join=False,
                start_method="spawn",
            )
            deadline = time.monotonic() + SPAWN_TIMEOUT_S
            while not pctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for p in pctx.processes:
                        if p.is_alive():
                            p.kill()
                    raise TimeoutError(f"{name}: worker processes still running after {SPAWN_TIMEOUT_S} s")
    except Skip as e:
        shutil.rmtree(fixture_dir, ignore_errors=True)
        return str(e)
    except (KeyboardInterrupt, SystemExit):
        shutil.rmtree(fixture_dir, ignore_errors=True)
        raise
    except BaseException as e:  # dcp's CheckpointException derives from BaseException
        shutil.rmtree(fixture_dir, ignore_errors=True)
        if may_fail:
            traceback.print_exc()
            msg = str(e).strip().splitlines()
            return f"failed on this torch version: {type(e).__name__}: {msg[-1] if msg else ''}"
        raise
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=False)
    ap.add_argument("--only", default=None, help="comma-separated fixture names (default: all but opt-in ones)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-verify", dest="verify", action="store_false", help="skip the dcp.load round-trip check")
    ap.add_argument("--list", action="store_true", help="list fixture names and exit")
    a = ap.parse_args(argv)
    if a.list:
        for n, (ws, *_r) in ALL.items():
            print(f"{n}\t{ws} rank(s){'' if n in FIXTURES else ' (opt-in)'}")
        return 0
    if not a.out:
        ap.error("--out is required")
    names = list(FIXTURES) if a.only is None else [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown:
        ap.error(f"unknown fixture(s): {', '.join(unknown)}; known: {', '.join(ALL)}")
    os.makedirs(a.out, exist_ok=True)
    print(f"torch {torch.__version__}, python {platform.python_version()}, seed {a.seed}", flush=True)
    for n in names:
        reason = run_fixture(n, a.out, a.seed, a.verify)
        if reason:
            print(f"SKIP {n}: {reason}", flush=True)
        else:
            print(f"ok   {n}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
