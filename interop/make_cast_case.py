"""A DCP checkpoint of floating tensors full of awkward bit patterns, and torch's own casts of each, for the
converter's `dtype` option.

usage: python interop/make_cast_case.py <out-dir> [--n 65536]

Writes <out>/dcp ({"model": {...}} the seed's way, 1 process), <out>/model/config.json (a minimal config), and
<out>/expected.safetensors with, for every source tensor `<name>` and every target dtype T in
{bfloat16, float16, float32, float64}, `<name>.<T>` = torch's `tensor.to(T)` (CPU). Sources:
  f32   every float32 class: ±0, ±inf, quiet/signalling NaNs with payloads and both signs, subnormals, the largest
        finite, exact round-to-nearest-even ties for bf16 and f16, fp16 overflow/underflow edges, then random bit patterns
  bf16, f16, f64   random bit patterns (NaNs included) plus the same specials
  i64   integers: must be copied unchanged whatever the target
Prints a JSON summary.
"""
import argparse
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TARGETS = ["bfloat16", "float16", "float32", "float64"]


def f32_specials():
    bits = [
        0x00000000, 0x80000000,  # ±0
        0x7F800000, 0xFF800000,  # ±inf
        0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FC12345, 0xFFFFFFFF, 0x7FFFFFFF,  # NaNs
        0x00000001, 0x80000001, 0x007FFFFF, 0x00400000, 0x00008000, 0x00018000,  # subnormals
        0x00800000, 0x80800000,  # smallest normals
        0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF,  # largest finite; bf16 overflow edge
        0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0xBF808000, 0xBF818000,  # bf16 ties / near-ties
        0x3F801000, 0x3F803000, 0x3F800FFF, 0x3F801001,  # f16 ties / near-ties (13 dropped bits)
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x47800000,  # 65504, just below / at the f16 overflow tie, 65536
        0x33800000, 0x33000000, 0x33000001, 0x387FC000, 0x38800000, 0x38000000,  # f16 subnormal / underflow edges
        0x3F800000, 0xBF800000, 0x40490FDB, 0x3EAAAAAB,  # 1, -1, pi, 1/3
    ]
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def random_bits(n, dtype, g):
    width = torch.finfo(dtype).bits
    int_dtype = {16: torch.int16, 32: torch.int32, 64: torch.int64}[width]
    raw = torch.randint(-(2 ** 62), 2 ** 62, (n,), generator=g, dtype=torch.int64)
    if width < 64:
        raw = (raw & ((1 << width) - 1)) - ((raw >> (width - 1)) & 1) * (1 << width)  # wrap into signed range
    return raw.to(int_dtype).view(dtype)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=65536)
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    g = torch.Generator().manual_seed(1234)
    sp = f32_specials()
    src = {
        "f32": torch.cat([sp, random_bits(a.n, torch.float32, g), torch.randn(a.n, generator=g) * 3.0]),
        "bf16": torch.cat([sp.to(torch.bfloat16), random_bits(a.n, torch.bfloat16, g)]),
        "f16": torch.cat([sp.to(torch.float16), random_bits(a.n, torch.float16, g)]),
        "f64": torch.cat([sp.to(torch.float64), random_bits(a.n, torch.float64, g), torch.randn(a.n, generator=g, dtype=torch.float64)]),
        "i64": torch.randint(-(2 ** 62), 2 ** 62, (257,), generator=g, dtype=torch.int64),
    }
    # one 2-D tensor (rows of 8) so shapes other than 1-D go through the cast too
    f32 = src["f32"]
    src["f32"] = torch.cat([f32, torch.zeros((-len(f32)) % 8)]).reshape(-1, 8)
    names = {k: f"cast.{k}.weight" for k in src}
    state = {names[k]: v.contiguous() for k, v in src.items()}
    dcp.save({"model": state}, checkpoint_id=os.path.join(out, "dcp"))
    expected = {}
    for name, t in state.items():
        for target in TARGETS:
            expected[f"{name}.{target}"] = t.to(getattr(torch, target)).contiguous() if t.is_floating_point() else t.clone()
    save_file(expected, os.path.join(out, "expected.safetensors"))
    os.makedirs(os.path.join(out, "model"), exist_ok=True)
    with open(os.path.join(out, "model", "config.json"), "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False, "dtype": "float32"}, f, indent=2)
    print(json.dumps({"out": out, "tensors": {n: [str(t.dtype), list(t.shape)] for n, t in state.items()}, "targets": TARGETS, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
