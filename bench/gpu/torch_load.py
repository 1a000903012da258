"""torch's side of the GPU bench: dcp.load of a checkpoint into CUDA tensors (cold and warm page cache), and the
sha256 of every tensor's bytes as torch loaded them (the reference distcp's GPU reads are checked against).

    python3 torch_load.py --ckpt DIR [--runs cold,warm] [--sums FILE] [--fp32-sums FILE] [--device cuda]

Prints `RESULT torch_<run>_gbps X`, `RESULT torch_drop_caches yes|no`; --sums writes `key<TAB>sha256` lines;
--fp32-sums the same for each loaded tensor's `.to(torch.float32)` on the device (what `gpu_bench castcheck`
compares distcp's device widening with), plus every bf16 and fp16 bit pattern widened there
(`__all_bf16_patterns__`, `__all_f16_patterns__`).
"""

import argparse
import ctypes
import hashlib
import os
import time
import warnings


def drop_caches():
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--runs", default="cold,warm")
    ap.add_argument("--sums")
    ap.add_argument("--fp32-sums")
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    md = dcp.FileSystemReader(a.ckpt).read_metadata()
    sd = {}
    for key, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            sd[key] = torch.empty(tuple(m.size), dtype=m.properties.dtype, device=device)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    print(f"torch_load: {len(sd)} tensors, {nbytes / 1e9:.2f} GB into {device} (torch {torch.__version__})", flush=True)
    for run in [r for r in a.runs.split(",") if r]:
        if run == "cold":
            dropped = drop_caches()
            print(f"RESULT torch_drop_caches {'yes' if dropped else 'no'}", flush=True)
        t = time.perf_counter()
        dcp.load(sd, checkpoint_id=a.ckpt)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        print(f"torch_load: {run}: {nbytes / 1e9:.2f} GB in {secs:.2f} s", flush=True)
        print(f"RESULT torch_{run}_gbps {nbytes / 1e9 / secs:.2f}", flush=True)
    if a.sums:
        with open(a.sums + ".tmp", "w") as out:
            for key in sorted(sd):
                host = sd[key].contiguous().cpu()
                n = host.numel() * host.element_size()
                view = (ctypes.c_char * n).from_address(host.data_ptr()) if n else b""
                out.write(f"{key}\t{hashlib.sha256(view).hexdigest()}\n")
        os.replace(a.sums + ".tmp", a.sums)
        print(f"torch_load: sha256 of {len(sd)} tensors → {a.sums}", flush=True)
    if a.fp32_sums:
        write_fp32_sums(torch, sd, device, a.fp32_sums)


def write_fp32_sums(torch, sd, device, path):
    def sha(t):
        host = t.contiguous().cpu()
        n = host.numel() * host.element_size()
        view = (ctypes.c_char * n).from_address(host.data_ptr()) if n else b""
        return hashlib.sha256(view).hexdigest()

    # bit patterns 0x0000 .. 0xFFFF in order, as int16 (two's complement), then reinterpreted
    x = torch.arange(65536, dtype=torch.int32)
    bits = torch.where(x >= 32768, x - 65536, x).to(torch.int16).to(device)
    rows = {key: sha(sd[key].to(torch.float32)) for key in sd}
    rows["__all_bf16_patterns__"] = sha(bits.view(torch.bfloat16).to(torch.float32))
    rows["__all_f16_patterns__"] = sha(bits.view(torch.float16).to(torch.float32))
    with open(path + ".tmp", "w") as out:
        for key in sorted(rows):
            out.write(f"{key}\t{rows[key]}\n")
    os.replace(path + ".tmp", path)
    print(f"torch_load: sha256 of .to(torch.float32) on {device} of {len(sd)} tensors + bit patterns → {path}", flush=True)


if __name__ == "__main__":
    main()
