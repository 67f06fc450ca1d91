"""Shared set-up for the benchmark scripts: bundled model, generated data, tokenized history per user."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile

import torch

from perfit.backbone import load_backbone
from perfit.config import RunConfig
from perfit.data import load_task_data
from perfit.data.synthetic import generate
from perfit.prompts import PromptBuilder
from perfit.train import tokenize_examples


def setup(task_name: str, num_users: int, history: int, seed: int = 0, model_path: str = "", cuda_device: int = 0, dtype: str = "auto"):
    cfg = RunConfig(task_name=task_name).resolved()
    root = os.path.join(tempfile.gettempdir(), "perfit-bench", f"{task_name}-{num_users}-{history}-{seed}")
    if not os.path.isfile(os.path.join(root, task_name, "user_top_100_history_label.json")):
        generate(task_name, root, num_users=num_users, history_per_user=history, queries_per_user=5, num_other_users=0, seed=seed)
    td = load_task_data(root, task_name)
    model, tok, info = load_backbone(model_path, dtype, cuda_device)
    pb = PromptBuilder(td.task)
    module_of = {u.user_id: k for k, u in enumerate(td.test_users)}
    ex = tokenize_examples(tok, [pb.history_example(it, u.user_id) for u in td.test_users for it in u.profile], cfg.max_length, module_of)
    return cfg, td, model, tok, info, ex


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_part(script: str, args: list[str]) -> dict:
    """Run one measured part in a fresh process (so its peak memory is its own); it prints one JSON line last."""
    out = subprocess.run([sys.executable, script, *args], check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])
