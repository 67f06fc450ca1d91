"""Shared set-up for the benchmark scripts: bundled model, generated data, tokenized history per user."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from perfit.backbone import load_backbone
from perfit.config import RunConfig
from perfit.data import load_task_data
from perfit.data.synthetic import generate
from perfit.prompts import PromptBuilder
from perfit.batching import tokenize_examples


def timed(fn, device, reps: int) -> float:
    """Mean seconds of `fn` over `reps` calls after one warm-up call (the device synchronised around them)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


# randomly initialised models of real widths, for throughput where real weights cannot travel (e.g. a GPU box)
RANDOM_MODELS = {
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4),
}


def random_backbone(spec: str, tokenizer_path: str, cuda_device: int = 0, dtype: str = "auto"):
    """A Llama of the named widths with random weights (built on the device) and a real tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from perfit.backbone import Backbone, BackboneInfo, _fix_tokenizer, freeze, pick_device, pick_dtype, resolve_model_path

    if spec not in RANDOM_MODELS:
        raise SystemExit(f"--random_model {spec!r}: choose from {', '.join(RANDOM_MODELS)}")
    device = pick_device(cuda_device)
    torch_dtype = pick_dtype(dtype, device)
    tok = _fix_tokenizer(AutoTokenizer.from_pretrained(tokenizer_path or resolve_model_path("")))
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **RANDOM_MODELS[spec])
    torch.manual_seed(0)
    with torch.device(device):
        model = freeze(AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype))
    info = BackboneInfo(f"random-{spec}", "random", cfg.num_hidden_layers, cfg.hidden_size, str(device),
                        str(torch_dtype).removeprefix("torch."))
    return Backbone(model, tok, info)


def add_model_args(ap) -> None:
    ap.add_argument("--model_path", default="", help="HF folder or .gguf (default: the bundled SmolLM2-135M)")
    ap.add_argument("--random_model", default="", help=f"instead: random weights of these widths: {', '.join(RANDOM_MODELS)}")
    ap.add_argument("--tokenizer_path", default="", help="with --random_model: tokenizer folder (default: the bundled model's)")
    ap.add_argument("--cuda_device", type=int, default=0)
    ap.add_argument("--dtype", default="auto")


def model_argv(args) -> list[str]:
    return ["--model_path", args.model_path, "--random_model", args.random_model, "--tokenizer_path", args.tokenizer_path,
            "--cuda_device", str(args.cuda_device), "--dtype", args.dtype]


def setup(task_name: str, num_users: int, history: int, args, seed: int = 0):
    cfg = RunConfig(task_name=task_name).resolved()
    root = os.path.join(tempfile.gettempdir(), "perfit-bench", f"{task_name}-{num_users}-{history}-{seed}")
    if not os.path.isfile(os.path.join(root, task_name, "user_top_100_history_label.json")):
        generate(task_name, root, num_users=num_users, history_per_user=history, queries_per_user=5, num_other_users=0, seed=seed)
    td = load_task_data(root, task_name)
    if args.random_model:
        model, tok, info = random_backbone(args.random_model, args.tokenizer_path, args.cuda_device, args.dtype)
    else:
        model, tok, info = load_backbone(args.model_path, args.dtype, args.cuda_device)
    pb = PromptBuilder(td.task)
    module_of = {u.user_id: k for k, u in enumerate(td.test_users)}
    ex = tokenize_examples(tok, [pb.history_example(it, u.user_id) for u in td.test_users for it in u.profile], cfg.max_length, module_of)
    return cfg, td, model, tok, info, ex


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device, peak: bool = True) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_part(script: str, args: list[str]) -> dict:
    """Run one measured part in a fresh process (so its peak memory is its own); it prints one JSON line last."""
    out = subprocess.run([sys.executable, script, *args], check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])
