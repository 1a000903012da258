"""Checks a converted Hugging Face folder against the case make_hf_case.py built, with real transformers + torch.

usage: python interop/check_hf_output.py <hf-dir> <case-dir> [--dtype float32|bfloat16|float16]

--dtype is the dtype the converter was asked to write (default: float32, i.e. no cast; the case is float32).
Checks, each recorded in the JSON report printed on stdout (exit status 1 on any mismatch, 2 on bad usage):
  files      `model.safetensors` alone, or `model-0000i-of-0000N.safetensors` (i = 1..N) + `model.safetensors.index.json`;
             no other *.safetensors in the folder (stale shards from an earlier run count as a failure)
  index      weight_map covers exactly the tensors found in the shards, each in the shard it names;
             metadata.total_size == sum of the tensors' data bytes
  shards     every shard opens with safetensors.safe_open, header metadata has format == "pt"; every tensor equals,
             bit for bit, torch's tensor from reference_state.safetensors (for bfloat16 the `<name>.bf16` entry, i.e.
             torch's `.to(torch.bfloat16)`; for float16 torch's `.to(torch.float16)` of the float32 tensor)
  keys       the tensor names are the model's parameters; for a tied case `lm_head.weight` is absent (it equals the
             embedding bit for bit), for an untied case it is present
  config     config.json equals the source config except its dtype field(s), which name the dtype written;
             generation_config.json equals the source one
  load       AutoModelForCausalLM.from_pretrained(<hf-dir>, output_loading_info=True): missing / unexpected /
             mismatched keys and error messages all empty; the parameters have the dtype written
  logits     on the saved input_ids: float32 → exactly the reference logits. Cast → exactly the logits of torch's own
             model built in that dtype from the source config and loaded with torch's `.to(dtype)` of every
             reference parameter, and within a tolerance of the float32 reference logits (see `bf16_tolerance`)
  tokenizer  every source tokenizer file is in <hf-dir> byte for byte; AutoTokenizer.from_pretrained(<hf-dir>)
             encodes the probe string exactly as the source tokenizer does
"""
import argparse
import json
import os
import re
import sys
import traceback

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
INDEX = "model.safetensors.index.json"


def same_bits(a, b):
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def bf16_tolerance(ref):
    """Tolerance for logits of a model whose weights (and, run in bf16, activations) are rounded to bfloat16.

    bfloat16 keeps 8 significant bits: each rounding has relative error ≤ 2^-9 ≈ 0.2%. Through embedding, 2 decoder
    layers (norm, 3 projections + softmax + o_proj, 3 MLP projections, residual adds) and the head, a logit picks up a
    few dozen such roundings, partly cancelling; a conservative bound is 2^-4 (6%) of the largest reference logit,
    plus the same absolute amount for logits near 0. It only guards against "a different model": the exact check
    is the one against torch's own cast model.
    """
    return float(ref.abs().max()) * 2.0**-4


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("case_dir")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    a = ap.parse_args()
    torch.set_num_threads(1)  # the reference logits were computed with one thread

    hf, case_dir = os.path.abspath(a.hf_dir), os.path.abspath(a.case_dir)
    dtype = DTYPES[a.dtype]
    errors = []
    report = {"hf_dir": hf, "case": case_dir, "dtype": a.dtype, "checks": {}, "errors": errors}

    def fail(check, msg):
        errors.append(f"{check}: {msg}")

    with open(os.path.join(case_dir, "case.json")) as f:
        case = json.load(f)
    ref = load_file(os.path.join(case_dir, "reference_state.safetensors"))
    params = [k for k in ref if not k.endswith(".bf16")]

    def expected(name):
        if a.dtype == "float32":
            return ref[name]
        if a.dtype == "bfloat16":
            return ref[name + ".bf16"]
        return ref[name].to(dtype)

    # ---- files and index
    names = sorted(os.listdir(hf))
    report["files"] = names
    st_files = [n for n in names if n.endswith(".safetensors")]
    weight_map = None
    index = None
    if INDEX in names:
        with open(os.path.join(hf, INDEX)) as f:
            index = json.load(f)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            fail("index", "no weight_map object")
            weight_map = {}
        listed = sorted(set(weight_map.values()))
        n = len(listed)
        want = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        if listed != want:
            fail("files", f"index names shards {listed}, expected {want}")
        if sorted(st_files) != listed:
            fail("files", f"safetensors files in the folder {st_files} != shards named by the index {listed}")
        if "model.safetensors" in names:
            fail("files", "both model.safetensors and an index")
    else:
        if st_files != ["model.safetensors"]:
            fail("files", f"without an index the only safetensors file must be model.safetensors, found {st_files}")
        if any(SHARD_RE.match(n) for n in names):
            fail("files", "numbered shards without an index")
    report["checks"]["shard_count"] = len(st_files)

    # ---- shards, bit for bit
    seen = {}
    total_bytes = 0
    mismatched = []
    for fname in sorted(st_files):
        try:
            with safe_open(os.path.join(hf, fname), framework="pt") as so:
                md = so.metadata()
                if not md or md.get("format") != "pt":
                    fail("shards", f"{fname}: header __metadata__ {md!r}, expected format == 'pt'")
                for key in so.keys():
                    t = so.get_tensor(key)
                    if key in seen:
                        fail("shards", f"{key} in both {seen[key]} and {fname}")
                    seen[key] = fname
                    total_bytes += t.numel() * t.element_size()
                    if weight_map is not None and weight_map.get(key) != fname:
                        fail("index", f"{key} is in {fname}, the index says {weight_map.get(key)}")
                    if key not in ref:
                        fail("keys", f"{fname}: unexpected tensor {key}")
                        continue
                    e = expected(key)
                    if not same_bits(t, e):
                        mismatched.append(key)
                        fail("shards", f"{fname}: {key}: {t.dtype} {list(t.shape)} differs from torch's {e.dtype} {list(e.shape)}"
                             + ("" if t.dtype != e.dtype or t.shape != e.shape else
                                f" (max |diff| {float((t.float() - e.float()).abs().max()):.3g})"))
        except Exception as e:  # safetensors refuses the file: that is a finding, not a crash of the checker
            fail("shards", f"{fname}: safe_open/get_tensor failed: {e}")
    report["checks"]["tensors"] = len(seen)
    report["checks"]["tensor_bytes"] = total_bytes
    report["checks"]["bit_identical"] = len(seen) - len(mismatched)

    if index is not None:
        if set(weight_map) != set(seen):
            fail("index", f"weight_map names {sorted(set(weight_map) - set(seen))} not in the shards; shards hold "
                          f"{sorted(set(seen) - set(weight_map))} not in weight_map")
        ts = (index.get("metadata") or {}).get("total_size")
        report["checks"]["index_total_size"] = ts
        if ts != total_bytes:
            fail("index", f"metadata.total_size {ts} != sum of tensor bytes {total_bytes}")

    # ---- keys: the parameters, lm_head dropped only for a tied model
    want_keys = set(params)
    if case["tied"]:
        want_keys.discard("lm_head.weight")
        if not same_bits(ref["lm_head.weight"], ref["model.embed_tokens.weight"]):
            fail("keys", "case says tied but torch's lm_head differs from the embedding (case is broken)")
    if set(seen) != want_keys:
        fail("keys", f"missing {sorted(want_keys - set(seen))}, extra {sorted(set(seen) - want_keys)}")

    # ---- config.json / generation_config.json
    try:
        with open(os.path.join(case_dir, "model", "config.json")) as f:
            src_cfg = json.load(f)
        with open(os.path.join(hf, "config.json")) as f:
            out_cfg = json.load(f)
        dkeys = [k for k in ("dtype", "torch_dtype") if k in src_cfg] or ["dtype"]
        for k in dkeys:
            if out_cfg.get(k) != a.dtype:
                fail("config", f"config.json {k} = {out_cfg.get(k)!r}, expected {a.dtype!r}")
        rest = lambda c: {k: v for k, v in c.items() if k not in ("dtype", "torch_dtype")}  # noqa: E731
        if rest(src_cfg) != rest(out_cfg):
            diff = sorted(k for k in set(src_cfg) | set(out_cfg) if src_cfg.get(k) != out_cfg.get(k))
            fail("config", f"config.json differs from the source beyond its dtype: {diff}")
        src_gen = os.path.join(case_dir, "model", "generation_config.json")
        if os.path.exists(src_gen):
            with open(src_gen) as f, open(os.path.join(hf, "generation_config.json")) as g:
                if json.load(f) != json.load(g):
                    fail("config", "generation_config.json differs from the source")
    except Exception as e:
        fail("config", f"{type(e).__name__}: {e}")

    # ---- transformers loads it; logits
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        model, info = AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True)
        info = {k: sorted(map(str, v)) for k, v in info.items()}
        report["checks"]["loading_info"] = info
        for k, v in info.items():
            if v:
                fail("load", f"{k}: {v}")
        pdt = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
        report["checks"]["loaded_dtypes"] = pdt
        if pdt != [a.dtype]:
            fail("load", f"parameters loaded as {pdt}, expected [{a.dtype!r}]")
        model.eval()
        rl = load_file(os.path.join(case_dir, "reference_logits.safetensors"))
        with torch.no_grad():
            got = model(input_ids=rl["input_ids"]).logits.float()
        if a.dtype == "float32":
            report["checks"]["logits_exact"] = bool(torch.equal(got, rl["logits"]))
            if not torch.equal(got, rl["logits"]):
                fail("logits", f"differ from the reference: max |diff| {float((got - rl['logits']).abs().max()):.3g}")
        else:
            # exact: torch's own model built in that dtype (as from_pretrained builds it: buffers such as the
            # rotary inv_freq keep their own dtype) holding torch's `.to(dtype)` of every float32 parameter
            torch.manual_seed(0)
            own = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(os.path.join(case_dir, "model")),
                                                   dtype=dtype)
            own.load_state_dict({k: ref[k].to(dtype) for k in params}, strict=True)
            own.eval()
            with torch.no_grad():
                want = own(input_ids=rl["input_ids"]).logits.float()
            report["checks"]["logits_exact_vs_torch_model_in_dtype"] = bool(torch.equal(got, want))
            if not torch.equal(got, want):
                fail("logits", f"differ from torch's own {a.dtype} model: max |diff| {float((got - want).abs().max()):.3g}")
            tol = bf16_tolerance(rl["logits"])
            d = float((got - rl["logits"]).abs().max())
            report["checks"]["logits_vs_float32"] = {"max_abs_diff": d, "tolerance": tol,
                                                     "argmax_agreement": float((got.argmax(-1) == rl["logits"].argmax(-1)).float().mean())}
            if not d <= tol:
                fail("logits", f"max |diff| vs float32 reference {d:.3g} > tolerance {tol:.3g}")
    except Exception as e:
        fail("load", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")

    # ---- tokenizer
    try:
        from transformers import AutoTokenizer

        src_tok = os.path.join(case_dir, "tokenizer")
        for n in sorted(os.listdir(src_tok)):
            p = os.path.join(hf, n)
            if not os.path.exists(p):
                fail("tokenizer", f"{n} not copied")
                continue
            with open(os.path.join(src_tok, n), "rb") as f, open(p, "rb") as g:
                if f.read() != g.read():
                    fail("tokenizer", f"{n} differs from the source file")
        ids = AutoTokenizer.from_pretrained(hf).encode(case["encode_probe"])
        want = AutoTokenizer.from_pretrained(src_tok).encode(case["encode_probe"])
        report["checks"]["tokenizer_ids"] = ids
        if ids != want:
            fail("tokenizer", f"encodes the probe as {ids}, the source as {want}")
    except Exception as e:
        fail("tokenizer", f"{type(e).__name__}: {e}")

    report["ok"] = not errors
    print(json.dumps(report, indent=1))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
