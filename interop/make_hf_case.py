"""Builds a tiny Llama-shaped model with real transformers + torch and saves it the seed's way, for the
DCP → Hugging Face conversion tests.

usage: python interop/make_hf_case.py <out-dir> [--tied|--untied] [--ranks 1|2] [--seed N] [--arch llama|qwen2|qwen3]
                                     [--writer dcp|hf-storage]

Writes, under <out-dir>:
  model/       config.json + generation_config.json (save_pretrained of the config objects only, no weights)
  tokenizer/   a BPE tokenizer trained here with `tokenizers`, saved as a transformers fast tokenizer
  dcp/         `dcp.save({"model": ModelState(model)}, checkpoint_id=…)`, ModelState.state_dict() being
               `get_model_state_dict(model, options=StateDictOptions(cpu_offload=True))` (NeMo-RL's ModelState);
               on 2 ranks (gloo, CPU) the model is FSDP2-sharded (`fully_shard`), so the weights are DTensors.
               --writer hf-storage: NeMo-RL v2's default instead, the HF-named model state dict saved with
               `HuggingFaceStorageWriter(save_distributed=True)` (per-rank `shard-*.safetensors`, no .metadata)
  reference_logits.safetensors   {"input_ids": int64 [2, 12], "logits": float32} of the original float32 model
  reference_state.safetensors    every state-dict tensor as torch has it, plus `<name>.bf16` = `.to(torch.bfloat16)`
  case.json    what was built (tied, ranks, seed, arch, sample text, how the weights were sharded)

Nothing is downloaded: HF_HUB_OFFLINE=1 is forced. Prints case.json.
"""
import argparse
import json
import os
import socket
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ModelState  # noqa: E402

SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Distributed checkpoints are read byte for byte.",
    "A tiny model, a tiny tokenizer, and a conversion to safetensors.",
    "Hello world! Hello tokenizer! 0123456789",
    "Llama, Qwen and friends share one layout: embed, attention, mlp, norm, head.",
]
ENCODE_PROBE = "Hello quick fox: checkpoints convert to safetensors, 42 times."


def train_tokenizer(out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=1,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SAMPLE_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(out_dir)
    return fast


def make_config(arch, vocab, tied, eos_id, pad_id):
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(**common)
    elif arch == "qwen2":
        from transformers import Qwen2Config

        cfg = Qwen2Config(**common)
    elif arch == "qwen3":
        from transformers import Qwen3Config

        cfg = Qwen3Config(head_dim=16, **common)
    else:
        raise SystemExit(f"unknown --arch {arch}")
    cfg.dtype = torch.float32
    return cfg


def build_model(cfg, seed):
    """Same weights on every process: seeded init, then a seeded perturbation (so they differ from the init)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():  # tied parameters appear once: perturbed once
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01)
    model.eval()
    return model


def save_weights(model, dcp_dir, writer):
    if writer == "hf-storage":
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

        sd = get_model_state_dict(model)
        dcp.save(sd, storage_writer=HuggingFaceStorageWriter(dcp_dir, save_distributed=True), no_dist=not dist.is_initialized())
    else:
        dcp.save({"model": ModelState(model)}, checkpoint_id=dcp_dir)


def rank_worker(rank, world, port, model_dir, seed, dcp_dir, info_path, writer="dcp"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    model = build_model(cfg, seed)
    how = None
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        how = "fully_shard (FSDP2) on a gloo CPU mesh"
    except Exception as e:  # pragma: no cover - older torch without CPU FSDP2
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        model = build_model(cfg, seed)
        with torch.no_grad():
            for mod in model.modules():
                for n, p in list(mod.named_parameters(recurse=False)):
                    mod.register_parameter(n, torch.nn.Parameter(distribute_tensor(p.data, mesh, [Shard(0)])))
        how = f"distribute_tensor(..., [Shard(0)]) per parameter (fully_shard failed: {e})"
    sd = ModelState(model).state_dict()
    kinds = sorted({type(v).__name__ for v in sd.values()})
    save_weights(model, dcp_dir, writer)
    dist.barrier()
    if rank == 0:
        with open(info_path, "w") as f:
            json.dump({"sharding": how, "state_dict_types": kinds}, f)
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--tied", dest="tied", action="store_true", default=True)
    g.add_argument("--untied", dest="tied", action="store_false")
    ap.add_argument("--ranks", type=int, choices=[1, 2], default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=["llama", "qwen2", "qwen3"], default="llama")
    ap.add_argument("--writer", choices=["dcp", "hf-storage"], default="dcp")
    a = ap.parse_args()
    torch.set_num_threads(1)  # logits must be reproducible bit for bit by check_hf_output.py

    from transformers import GenerationConfig

    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    tok = train_tokenizer(os.path.join(out, "tokenizer"))
    vocab = max(256, len(tok))
    cfg = make_config(a.arch, vocab, a.tied, tok.eos_token_id, tok.pad_token_id)
    cfg.save_pretrained(os.path.join(out, "model"))
    GenerationConfig(
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=16,
    ).save_pretrained(os.path.join(out, "model"))

    model = build_model(cfg, a.seed)
    if a.tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight, "tie_word_embeddings did not tie"
    else:
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)

    # reference logits of the original float32 model on a fixed input
    gi = torch.Generator().manual_seed(a.seed + 2)
    input_ids = torch.randint(0, vocab, (2, 12), generator=gi, dtype=torch.int64)
    probe = tok.encode(ENCODE_PROBE)[:12]
    input_ids[0, : len(probe)] = torch.tensor(probe, dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float().contiguous()
    save_file({"input_ids": input_ids, "logits": logits}, os.path.join(out, "reference_logits.safetensors"))

    ref = {}
    for name, t in model.state_dict().items():
        ref[name] = t.detach().clone().contiguous()  # clone: tied tensors share storage, safetensors refuses that
        ref[name + ".bf16"] = t.detach().to(torch.bfloat16).contiguous()
    save_file(ref, os.path.join(out, "reference_state.safetensors"))

    dcp_dir = os.path.join(out, "dcp")
    info = {"sharding": "none (1 process, no process group)", "state_dict_types": None}
    if a.ranks == 1:
        sd = ModelState(model).state_dict()
        info["state_dict_types"] = sorted({type(v).__name__ for v in sd.values()})
        save_weights(model, dcp_dir, a.writer)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        info_path = os.path.join(out, ".rank-info.json")
        mp.spawn(rank_worker, args=(a.ranks, port, os.path.join(out, "model"), a.seed, dcp_dir, info_path, a.writer), nprocs=a.ranks, join=True)
        with open(info_path) as f:
            info = json.load(f)
        os.remove(info_path)

    case = {
        "out": out,
        "arch": a.arch,
        "tied": a.tied,
        "ranks": a.ranks,
        "writer": a.writer,
        "seed": a.seed,
        "vocab_size": vocab,
        "tokenizer_len": len(tok),
        "encode_probe": ENCODE_PROBE,
        "parameters": sorted(ref_name for ref_name in ref if not ref_name.endswith(".bf16")),
        "dcp_files": sorted(os.listdir(dcp_dir)),
        "torch": torch.__version__,
        **info,
    }
    with open(os.path.join(out, "case.json"), "w") as f:
        json.dump(case, f, indent=2)
    print(json.dumps(case))


if __name__ == "__main__":
    sys.exit(main())
