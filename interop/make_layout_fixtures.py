"""Writes small checkpoints in the layouts torch (>= 2.9) writes besides torch.save-record DCP, plus the values
torch's own reader returns from them.

usage: python interop/make_layout_fixtures.py --out <dir> [--only name1,name2] [--list]

Same output as interop/make_fixtures.py (see fixtures/README.md): <dir>/<name>/ckpt/, expected.json,
expected.safetensors. Layouts:
  dcp-st-{1,2,3}rank        FileSystemWriter(serialization_format=SAFETENSORS): .metadata + safetensors blobs
  hf-sharded-{1,2,3}rank    HuggingFaceStorageWriter(save_distributed=True): per-rank shard-*.safetensors
  hf-consolidated-2rank     HuggingFaceStorageWriter(save_distributed=True, enable_consolidation=True) with an
                            fqn_to_index_mapping over two files: model-*.safetensors + index beside sharded/
  hf-folder-single          huggingface_hub.save_torch_state_dict: model.safetensors
  hf-folder-sharded         huggingface_hub.save_torch_state_dict with a small max_shard_size: shards + index

Each multi-rank fixture holds DTensors on a 1-D CPU mesh: Shard(0) uneven (7 rows over the ranks), Shard(1),
Replicate, in bfloat16, float16, float32 and float8_e4m3fn (the odd dtype). Expected values are what torch's
reader for the layout returns: dcp.load with HuggingFaceStorageReader for the HF layouts. torch's FileSystemReader
cannot load safetensors-serialized DCP (it torch.load()s the blob), so for dcp-st the expected values are the
full tensors torch saved, cross-checked here against the blobs as the `safetensors` library reads them.
"""
import argparse
import json
import os
import shutil
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import dtype_name, enc  # noqa: E402
from common import raw_uint8 as raw_bytes  # noqa: E402

warnings.filterwarnings("ignore")

SPAWN_TIMEOUT_S = 300


def free_port():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def full_values(seed):
    """The global tensors every layout stores (same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "layers.0.weight": r(7, 5).to(torch.bfloat16),  # Shard(0), uneven
        "layers.0.bias": r(7).to(torch.float16),  # Shard(0), uneven
        "layers.1.weight": r(3, 8),  # Shard(1), float32
        "norm.weight": r(6).to(torch.bfloat16),  # Replicate
        "scale": (r(4, 4) * 8).to(torch.float8_e4m3fn),  # Shard(0), the odd dtype
    }


PLACEMENT = {"layers.0.weight": "s0", "layers.0.bias": "s0", "layers.1.weight": "s1", "norm.weight": "r", "scale": "s0"}


def dtensor_state(world_size, seed):
    from torch.distributed.tensor import DeviceMesh, Replicate, Shard, distribute_tensor

    mesh = DeviceMesh("cpu", list(range(world_size)))
    out = {}
    for k, v in full_values(seed).items():
        p = {"s0": Shard(0), "s1": Shard(1), "r": Replicate()}[PLACEMENT[k]]
        # float8 has no gloo collective: scatter its bytes as uint8 and view back
        if v.dtype == torch.float8_e4m3fn:
            d = distribute_tensor(v.view(torch.uint8), mesh, [p])
            from torch.distributed.tensor import DTensor

            d = DTensor.from_local(d.to_local().view(torch.float8_e4m3fn), mesh, [p], run_check=False, shape=v.shape, stride=v.stride())
        else:
            d = distribute_tensor(v, mesh, [p])
        out[k] = d
    return out


def write_expected(fixture_dir, world_size, tensors, objects=None):
    """expected.json + expected.safetensors in make_fixtures.py's format; `tensors` are torch's read-back values."""
    from safetensors.torch import save_file

    objects = objects or {}
    tree = {"t": "dict", "v": []}
    for k in tensors:
        tree["v"].append([{"t": "str", "v": k}, {"t": "tensor", "key": k}])
    for k, v in objects.items():
        tree["v"].append([{"t": "str", "v": k}, enc(v)])
    expected = {
        "torch_version": torch.__version__.split("+")[0],
        "python_version": sys.version.split()[0],
        "world_size": world_size,
        "tensors": {k: {"dtype": dtype_name(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()},
        "objects": {k: enc(v) for k, v in objects.items()},
        "tree": tree,
    }
    with open(os.path.join(fixture_dir, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
    save_file({k: raw_bytes(v) for k, v in tensors.items()}, os.path.join(fixture_dir, "expected.safetensors"))


def load_with_hf_reader(path, like):
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    out = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in like.items()}
    dcp.load(out, storage_reader=HuggingFaceStorageReader(path), no_dist=True)
    return out


def check_same(got, want, what):
    for k, v in want.items():
        if not torch.equal(got[k].view(torch.uint8), v.contiguous().view(torch.uint8)):
            raise AssertionError(f"{what}: {k} differs")


def blobs_of_dcp_st(ckpt):
    """Reassembles every tensor of a safetensors-serialized DCP from its blobs, as the safetensors library reads them."""
    from safetensors.torch import load as st_load
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(ckpt).read_metadata()
    full = {}
    for k, m in md.state_dict_metadata.items():
        if hasattr(m, "chunks"):
            full[k] = torch.zeros(m.size, dtype=m.properties.dtype)
    for idx, info in md.storage_data.items():
        if idx.offset is None:
            continue
        with open(os.path.join(ckpt, info.relative_path), "rb") as f:
            f.seek(info.offset)
            blob = f.read()
        header_len = int.from_bytes(blob[:8], "little")
        sharding = json.loads(json.loads(blob[8 : 8 + header_len])["__metadata__"]["DCP_SHARDING_INFO"])
        t = st_load(blob)[idx.fqn]
        assert list(sharding[idx.fqn]["saved_offsets"]) == list(idx.offset)
        sl = tuple(slice(o, o + s) for o, s in zip(idx.offset, t.shape))
        full[idx.fqn][sl] = t
    return full


# ----------------------------------------------------------------------------------------------------------------
# fixtures: each runs on every rank with a process group (world_size > 1) or none


def fx_dcp_st(ctx):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    ckpt = os.path.join(ctx["dir"], "ckpt")
    sd = dtensor_state(ctx["ws"], ctx["seed"]) if ctx["ws"] > 1 else full_values(ctx["seed"])
    sd = {**sd, "step": 7}
    dcp.save(sd, storage_writer=FileSystemWriter(ckpt, serialization_format=SerializationFormat.SAFETENSORS), no_dist=ctx["ws"] == 1)
    if ctx["rank"] == 0:
        want = full_values(ctx["seed"])
        check_same(blobs_of_dcp_st(ckpt), want, "dcp-st blobs vs saved tensors")
        write_expected(ctx["dir"], ctx["ws"], want, {"step": 7})


def fx_hf_sharded(ctx):
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    ckpt = os.path.join(ctx["dir"], "ckpt")
    sd = dtensor_state(ctx["ws"], ctx["seed"]) if ctx["ws"] > 1 else full_values(ctx["seed"])
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(ckpt, save_distributed=True), no_dist=ctx["ws"] == 1)
    if ctx["rank"] == 0:
        want = full_values(ctx["seed"])
        got = load_with_hf_reader(ckpt, want)
        check_same(got, want, "HuggingFaceStorageReader vs saved tensors")
        write_expected(ctx["dir"], ctx["ws"], got)


def fx_hf_consolidated(ctx):
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    ckpt = os.path.join(ctx["dir"], "ckpt")
    keys = list(full_values(ctx["seed"]))
    mapping = {k: 1 if i < 2 else 2 for i, k in enumerate(keys)}
    sd = dtensor_state(ctx["ws"], ctx["seed"])
    w = HuggingFaceStorageWriter(ckpt, fqn_to_index_mapping=mapping, save_distributed=True, enable_consolidation=True)
    dcp.save(sd, storage_writer=w)
    if ctx["rank"] == 0:
        want = full_values(ctx["seed"])
        got = load_with_hf_reader(ckpt, want)
        check_same(got, want, "consolidated output vs saved tensors")
        write_expected(ctx["dir"], ctx["ws"], got)


def fx_hf_folder(ctx, max_shard):
    from huggingface_hub import save_torch_state_dict

    ckpt = os.path.join(ctx["dir"], "ckpt")
    want = full_values(ctx["seed"])
    os.makedirs(ckpt)
    save_torch_state_dict(want, ckpt, max_shard_size=max_shard)
    got = load_with_hf_reader(ckpt, want)
    check_same(got, want, "HF folder vs saved tensors")
    write_expected(ctx["dir"], 1, got)


FIXTURES = {
    "layout-dcp-st-1rank": (1, fx_dcp_st),
    "layout-dcp-st-2rank": (2, fx_dcp_st),
    "layout-dcp-st-3rank": (3, fx_dcp_st),
    "layout-hf-sharded-1rank": (1, fx_hf_sharded),
    "layout-hf-sharded-2rank": (2, fx_hf_sharded),
    "layout-hf-sharded-3rank": (3, fx_hf_sharded),
    "layout-hf-consolidated-2rank": (2, fx_hf_consolidated),
    "layout-hf-folder-single": (1, lambda c: fx_hf_folder(c, "5GB")),
    "layout-hf-folder-sharded": (1, lambda c: fx_hf_folder(c, 100)),
}


def _worker(rank, name, world_size, fixture_dir, seed, port):
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    FIXTURES[name][1]({"rank": rank, "ws": world_size, "dir": fixture_dir, "seed": seed})
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_fixture(name, out, seed):
    world_size, fn = FIXTURES[name]
    fixture_dir = os.path.join(out, name)
    shutil.rmtree(fixture_dir, ignore_errors=True)
    os.makedirs(fixture_dir)
    try:
        if world_size == 1:
            fn({"rank": 0, "ws": 1, "dir": fixture_dir, "seed": seed})
        else:
            import torch.multiprocessing as mp

            os.environ.setdefault("OMP_NUM_THREADS", "1")
            pctx = mp.start_processes(
                _worker, args=(name, world_size, fixture_dir, seed, free_port()), nprocs=world_size, join=False, start_method="spawn"
            )
            deadline = time.monotonic() + SPAWN_TIMEOUT_S
            while not pctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for p in pctx.processes:
                        if p.is_alive():
                            p.kill()
                    raise TimeoutError(f"{name}: worker processes still running after {SPAWN_TIMEOUT_S} s")
    except BaseException:
        shutil.rmtree(fixture_dir, ignore_errors=True)
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--only", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    if a.list:
        for n, (ws, _) in FIXTURES.items():
            print(f"{n}\t{ws} rank(s)")
        return 0
    if not a.out:
        ap.error("--out is required")
    names = list(FIXTURES) if a.only is None else [n.strip() for n in a.only.split(",") if n.strip()]
    os.makedirs(a.out, exist_ok=True)
    print(f"torch {torch.__version__}, seed {a.seed}", flush=True)
    for n in names:
        run_fixture(n, a.out, a.seed)
        print(f"ok   {n}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
