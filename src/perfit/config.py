"""Typed settings. Every field carries its help text; the CLI is generated from these dataclasses,
and every checkpoint stores the config that made it so it reloads without the command line."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .tasks import get_task, preset


def _f(default: Any, help: str, **kw) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    task_name: str = _f("movie_tagging", "LaMP task: movie_tagging, news_categorize or news_headline.")
    data_dir: str = _f("", "Folder holding <task_name>/ in the per-user layout. Empty: generated data under output_dir/data.")
    output_dir: str = _f("output", "Root of all outputs: <output_dir>/<task_name>/<run_dir_name>/.")
    run_dir_name: str = _f("", "Run folder name. Empty: derived from the settings (lr=..._ulr=..._il=..._pl=...).")
    model_name: str = _f("smollm2-135m", "Name of the model in output paths.")
    model_path: str = _f("", "Local Hugging Face folder or .gguf file. Empty: the bundled SmolLM2-135M-Instruct.")
    cuda_device: int = _f(0, "GPU index when CUDA is present; ignored (with a notice) on CPU-only machines.")
    dtype: str = _f("auto", "Backbone dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
    seed: int = _f(42, "Seed for initialisation, data order and generated data.")
    batch_size: int = _f(8, "Examples per optimisation step (stage 2: per user per step).")
    eval_batch_size: int = _f(32, "Queries per generation batch (users mixed freely).")
    low_rank_dimension: int = _f(-1, "Rank of the collective shift (LRank). -1: task preset.")
    user_low_rank_dimension: int = _f(-1, "Rank of each personal shift (ULRank). -1: task preset.")
    intervene_layer: str = _f("", "Decoder layers to shift, ';'-separated (e.g. '14;15'). Empty: task preset.")
    positions: str = _f("", "Prompt positions to shift: fN, lN or fN+lM. Empty: task preset.")
    max_epoch: int = _f(-1, "Epochs of stage 2 (and of stage 1 unless stage1_epochs is set). -1: task preset.")
    stage1_epochs: int = _f(-1, "Epochs of stage 1. -1: same as max_epoch.")
    shift_init: str = _f("loreft", "Initial shifts: loreft (pyreft's random W, b) or zero (W = R, b = 0: each shift starts as the identity).")
    lr: float = _f(2e-3, "AdamW learning rate of stage 1 (no weight decay: it stalls these tiny modules).")
    user_lr: float = _f(2e-3, "AdamW learning rate of stage 2.")
    max_users: int = _f(0, "Use only the first N test users (0: all).")
    max_stage1_examples: int = _f(0, "Use at most N stage-1 examples, taken evenly across users (0: all).")
    holdout: int = _f(0, "Tuning mode: each test user's last N history items become its queries and the rest its history; the real queries are never used. 0: off.")
    max_history: int = _f(0, "Train each test user on at most their N latest history items (0: all).")
    query_cue: int = _f(1, "1: a query input that lacks the template's answer cue (' category:', ' headline:') gets it, as history prompts end (LaMP's official inputs stop before it); 0: inputs exactly as given.")
    max_field_words: int = _f(768, "Truncate each text field of a prompt to this many words (OPPU: 768).")
    max_length: int = _f(2048, "Truncate prompt+target to this many tokens, keeping the end of the prompt.")
    rows_per_pass: int = _f(32, "Training rows per forward pass (a step's per-user batches are packed up to this; larger suits a GPU).")
    user_group_size: int = _f(32, "Stage 2 trains this many users at once in one batched loop; each group is stored when done.")
    cache_max_bytes: int = _f(2 * 1024**3, "Bound on the in-memory cache of frozen states; beyond it they go to a memory-mapped file on disk.")
    disk_cache_max_bytes: int = _f(32 * 1024**3, "Bound on the memory-mapped disk cache of frozen states (0: none); beyond it they are recomputed each epoch.")
    disk_cache_dir: str = _f("", "Folder of the memory-mapped state cache (its file is unlinked at once). Empty: <run dir>/cache.")
    prompts_file: str = _f("", "JSON file of prompt templates replacing the packaged configs/prompts.json.")
    num_users: int = _f(20, "Generated data only: test users.")
    num_other_users: int = _f(12, "Generated data only: stage-1 (other) users.")
    history_per_user: int = _f(20, "Generated data only: history items per user.")
    queries_per_user: int = _f(5, "Generated data only: queries per user.")

    def resolved(self) -> "RunConfig":
        """Fill preset values (-1 / empty) from the task preset."""
        get_task(self.task_name)
        p = preset(self.task_name)
        c = dataclasses.replace(self)
        if c.low_rank_dimension < 0:
            c.low_rank_dimension = int(p["low_rank_dimension"])
        if c.user_low_rank_dimension < 0:
            c.user_low_rank_dimension = int(p["user_low_rank_dimension"])
        if not c.intervene_layer:
            c.intervene_layer = str(p["intervene_layer"])
        if not c.positions:
            c.positions = str(p["positions"])
        if c.max_epoch < 0:
            c.max_epoch = int(p["max_epoch"])
        if c.stage1_epochs < 0:
            c.stage1_epochs = c.max_epoch
        for name in ("low_rank_dimension", "user_low_rank_dimension", "max_epoch", "batch_size", "eval_batch_size"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
        c.intervene_layer = ";".join(str(l) for l in parse_layers(c.intervene_layer))  # one spelling per layer set
        from .shifts import SHIFT_INITS, parse_positions  # local: shifts imports torch

        parse_positions(c.positions)
        if c.shift_init not in SHIFT_INITS:
            raise ValueError(f"shift_init {c.shift_init!r}: choose from {', '.join(SHIFT_INITS)}")
        return c

    @property
    def layers(self) -> list[int]:
        return parse_layers(self.intervene_layer)

    def default_run_dir(self) -> str:
        il = self.intervene_layer.replace(";", ".")
        return (f"lr={self.low_rank_dimension}_ulr={self.user_low_rank_dimension}_il={il}_pl={self.positions}"
                f"_ep={self.max_epoch}_bs={self.batch_size}_seed={self.seed}_model={self.model_name}"
                + (f"_init={self.shift_init}" if self.shift_init != LATE_DEFAULTS["shift_init"] else "")
                + ("_queries=as_given" if not self.query_cue else "")
                + (f"_holdout={self.holdout}" if self.holdout > 0 else ""))

    def stage1_key(self, data_fingerprint: str) -> str:
        """Hash of everything stage 1's result depends on; a checkpoint is reused only on an exact match."""
        keys = ("task_name", "model_name", "model_path", "dtype", "seed", "batch_size", "low_rank_dimension",
                "user_low_rank_dimension", "intervene_layer", "positions", "stage1_epochs", "lr",
                "shift_init", "query_cue", "max_stage1_examples", "max_field_words", "max_length", "prompts_file")
        blob = json.dumps(_without_late_defaults({k: getattr(self, k) for k in keys}) | {"data": data_fingerprint},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


METHODS = ("user_majority", "zero_shot", "rag", "task_lora", "oppu", "stage1", "perfit", "perfit_stage2_only")


@dataclass
class CompareConfig(RunConfig):
    methods: str = _f(",".join(METHODS), "Comma-separated methods to run, from: " + ", ".join(METHODS) + ".")
    output_dir: str = _f("compare", "Folder of comparison.{json,md,png}, methods/*.json and every method's checkpoints.")
    rag_k: int = _f(2, "rag: history items retrieved into each prompt.")
    rag_item_words: int = _f(64, "rag: words kept of each text field of a retrieved item.")
    lora_rank: int = _f(8, "task_lora / oppu: LoRA rank (OPPU: 8).")
    lora_alpha: int = _f(16, "task_lora / oppu: LoRA alpha.")
    lora_targets: str = _f("q_proj,v_proj", "task_lora / oppu: modules that get LoRA (OPPU: q and v projections).")
    lora_lr: float = _f(1e-3, "task_lora: AdamW learning rate (same epochs as stage 1).")
    oppu_lr: float = _f(1e-3, "oppu: per-user AdamW learning rate (same epochs as stage 2).")
    isolate: int = _f(1, "1: each method in its own process (own peak memory); 0: all in this process.")

    def method_list(self) -> list[str]:
        ms = [m.strip() for m in self.methods.split(",") if m.strip()]
        bad = [m for m in ms if m not in METHODS]
        if bad or not ms:
            raise ValueError(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
        return ms

    def key(self, method: str) -> str:
        """Everything `method`'s result depends on: the shared settings plus its own (so changing, say, oppu_lr reruns
        only oppu). The method list, isolation and output folder do not count."""
        own = set().union(*METHOD_FIELDS.values())
        d = {k: v for k, v in to_dict(self).items() if (k not in own or k in METHOD_FIELDS[method])
             and k not in ("methods", "isolate", "output_dir") + SPEED_ONLY}
        return hashlib.sha256(json.dumps(_without_late_defaults(d), sort_keys=True).encode()).hexdigest()[:16]


# settings added after checkpoints existed count in their keys only when changed, so those checkpoints stay reusable
LATE_DEFAULTS = {"shift_init": "loreft", "query_cue": 0}


def _without_late_defaults(d: dict) -> dict:
    return {k: v for k, v in d.items() if not (k in LATE_DEFAULTS and v == LATE_DEFAULTS[k])}


# settings that change how fast results come, not the results (up to float rounding)
SPEED_ONLY = ("cache_max_bytes", "disk_cache_max_bytes", "disk_cache_dir", "rows_per_pass", "user_group_size", "eval_batch_size")
_SHIFT = ("low_rank_dimension", "user_low_rank_dimension", "intervene_layer", "positions", "stage1_epochs", "lr",
          "shift_init", "max_stage1_examples", "run_dir_name")
_LORA = ("lora_rank", "lora_alpha", "lora_targets", "lora_lr", "stage1_epochs", "max_stage1_examples")
METHOD_FIELDS = {
    "user_majority": (), "zero_shot": (), "rag": ("rag_k", "rag_item_words"),
    "task_lora": _LORA, "oppu": _LORA + ("oppu_lr", "max_epoch"),
    "stage1": _SHIFT, "perfit": _SHIFT + ("user_lr", "max_epoch"),
    "perfit_stage2_only": ("intervene_layer", "positions", "low_rank_dimension", "user_low_rank_dimension", "user_lr",
                           "shift_init", "max_epoch", "run_dir_name"),
}


def parse_layers(spec: str) -> list[int]:
    try:
        layers = [int(x) for x in str(spec).replace(",", ";").split(";") if x.strip()]
    except ValueError:
        raise ValueError(f"intervene_layer must be ';'-separated integers like '14;15', got {spec!r}") from None
    if not layers or any(x < 0 for x in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"intervene_layer must list distinct non-negative layers, got {spec!r}")
    return sorted(layers)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, d: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**d)
