"""A DCP checkpoint of floating tensors full of awkward bit patterns, and torch's own casts of each, for the
converter's `dtype` option.

usage: python interop/make_cast_case.py <out-dir> [--n 65536] [--fp8]

Writes <out>/dcp ({"model": {...}} the seed's way, 1 process), <out>/model/config.json (a minimal config), and
<out>/expected.safetensors with, for every source tensor `<name>` and every target dtype T in
{bfloat16, float16, float32, float64}, `<name>.<T>` = torch's `tensor.to(T)` (CPU). Sources:
  f32   every float32 class: ±0, ±inf, quiet/signalling NaNs with payloads and both signs, subnormals, the largest
        finite, exact round-to-nearest-even ties for bf16 and f16, fp16 overflow/underflow edges, then random bit patterns
  bf16, f16, f64   random bit patterns (NaNs included) plus the same specials
  i64   integers: must be copied unchanged whatever the target
With --fp8 the case is about float8_e4m3fn / float8_e5m2 instead: sources are every fp8 byte (256 of each),
every bfloat16 bit pattern (65,536), float32 random bit patterns plus random numbers around the fp8 range (ties,
subnormals, the overflow edges), float16 and float64 random patterns; `expected.safetensors` holds `<name>.<T>`
only where the source or the target T is fp8 (the rest is the plain case's), T over the six floating dtypes.
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
FP8 = ["float8_e4m3fn", "float8_e5m2"]


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


def fp8_f32_specials():
    """float32 numbers at fp8's edges: e4m3fn 448 / 464 (tie) / 480, e5m2 57344 / 61440 (tie) / 65536, subnormal
    ties of both, the smallest normals, and exact ties of the dropped mantissa bits."""
    vals = [448.0, 464.0, 464.00003, 470.0, 479.99997, 480.0, 57344.0, 61439.996, 61440.0, 65536.0, 1e30, 3.4e38,
            2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -10, 5 * 2.0 ** -11, 2.0 ** -6, 2.0 ** -6 - 2.0 ** -10,
            2.0 ** -16, 2.0 ** -17, 3 * 2.0 ** -17, 2.0 ** -14, 1.0625, 1.1875, 1.125, 1.375, 1.0 + 2.0 ** -4 + 2.0 ** -20]
    t = torch.tensor(vals, dtype=torch.float32)
    return torch.cat([t, -t])


def fp8_sources(n, g):
    sp = torch.cat([f32_specials(), fp8_f32_specials()])
    # numbers around the fp8 range: random sign and mantissa, exponent uniform over [2^-22, 2^17)
    exp = torch.randint(127 - 22, 127 + 17, (n,), generator=g, dtype=torch.int64)
    mant = torch.randint(0, 1 << 23, (n,), generator=g, dtype=torch.int64)
    # a quarter of them exact ties or near-ties of the dropped bits
    mant[: n // 4] = (mant[: n // 4] & ~((1 << 21) - 1)) | (1 << 19) | torch.randint(0, 2, (n // 4,), generator=g) * (1 << 20)
    sign = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) << 31
    near = (sign | (exp << 23) | mant)
    near = ((near & 0xFFFFFFFF) - ((near >> 31) & 1) * (1 << 32)).to(torch.int32).view(torch.float32)
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return {
        "e4m3": every_byte.view(torch.float8_e4m3fn),
        "e5m2": every_byte.view(torch.float8_e5m2),
        "bf16all": torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16),
        "f32": torch.cat([sp, near, random_bits(n, torch.float32, g)]),
        "f16": torch.cat([sp.to(torch.float16), random_bits(n, torch.float16, g)]),
        "f64": torch.cat([sp.to(torch.float64), near.to(torch.float64), random_bits(n, torch.float64, g)]),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--fp8", action="store_true")
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    g = torch.Generator().manual_seed(1234)
    if a.fp8:
        return main_fp8(out, a.n, g)
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


def write_model(out, state, expected, targets):
    dcp.save({"model": state}, checkpoint_id=os.path.join(out, "dcp"))
    save_file(expected, os.path.join(out, "expected.safetensors"))
    os.makedirs(os.path.join(out, "model"), exist_ok=True)
    with open(os.path.join(out, "model", "config.json"), "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False, "dtype": "float32"}, f, indent=2)
    print(json.dumps({"out": out, "tensors": {n: [str(t.dtype), list(t.shape)] for n, t in state.items()}, "targets": targets, "torch": torch.__version__}))


def main_fp8(out, n, g):
    state = {f"cast.{k}.weight": v.contiguous() for k, v in fp8_sources(n, g).items()}
    targets = TARGETS + FP8
    expected = {}
    for name, t in state.items():
        for target in targets:
            if str(t.dtype).removeprefix("torch.") in FP8 or target in FP8:
                expected[f"{name}.{target}"] = t.to(getattr(torch, target)).clone()
    write_model(out, state, expected, targets)


if __name__ == "__main__":
    main()
