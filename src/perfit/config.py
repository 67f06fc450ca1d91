"""Typed settings. Every field carries its help text and declares what it affects; the CLI is generated from these
dataclasses, every reuse key is derived from the declarations, and every saved artifact stores the config that
made it, so it reloads without the command line.

What a field can affect (`affects`), as a graph of artifacts; a key changes when any of its own fields, its
parents' keys or its data fingerprint change:

    model ─┬──────────────────────────────┬─> stage2_only
           │                              ├─> task_lora ──> oppu
    stage1_data ──> stage1 ─┬─> users      │
                            └─> generator ─┘ (users)
    test_data ──────────────────┴─────────┴─ (users, stage2_only, oppu and every prediction use the test data)
    rag, predictions: settings of the comparison records only

A field that affects nothing (output folders, speed settings, checks) is declared with `affects=()`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .tasks import get_task, preset

# artifact -> the artifacts it is built from (topological order)
ARTIFACTS: dict[str, tuple[str, ...]] = {
    "model": (),
    "stage1_data": (),
    "test_data": (),
    "stage1": ("model", "stage1_data"),
    "generator": ("stage1",),
    "users": ("stage1", "generator", "test_data"),
    "stage2_only": ("model", "test_data"),
    "task_lora": ("model", "stage1_data"),
    "oppu": ("task_lora", "test_data"),
    "rag": (),
    "predictions": (),
}
DATA = ("stage1_data", "test_data")


def _f(default: Any, help: str, affects: tuple[str, ...], min: float | None = None, choices: tuple | None = None,
       run_override: bool = False) -> Any:
    """A field: its help, what it affects, its bounds; `run_override`: it may change on a finished run (how the run's
    model is loaded and run, which users and data it predicts for), never what the run trained or stored."""
    unknown = set(affects) - set(ARTIFACTS)
    assert not unknown, unknown
    return field(default=default, metadata={"help": help, "affects": tuple(affects), "min": min, "choices": choices,
                                            "run_override": run_override})


PERSONALIZE_MODES = ("train", "instant", "instant+train")
# the one dtype vocabulary of every command (backbone.torch_dtype maps them): auto, the torch names and their short forms
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64", "fp32", "bf16", "fp16")
GENERATOR_MIN_USERS = 120  # stage-1 users generated data gets when the generator is on

# a setting whose default is "preset" (-1 / empty) takes its task preset's value, else this
PRESET_FALLBACKS = {"user_lr": 2e-3, "shift_init": "loreft", "early_stopping": 0, "oppu_lr": 1e-3}


@dataclass
class RunConfig:
    task_name: str = _f("movie_tagging", "LaMP task: citation (LaMP-1), movie_tagging (2M), news_categorize (2N), product_rating (3), news_headline (4), scholarly_title (5) or tweet_paraphrase (7).", DATA)
    data_dir: str = _f("", "Folder holding <task_name>/ in the per-user layout. Empty: generated data under output_dir/data.", DATA, run_override=True)
    output_dir: str = _f("output", "Root of all outputs: <output_dir>/<task_name>/<run_dir_name>/.", ())
    run_dir_name: str = _f("", "Run folder name. Empty: derived from the settings (lr=..._ulr=..._il=..._pl=..._<hash of all settings that change results>).", ())
    model_name: str = _f("", "Name of the model in logs, run-dir names and results. Empty: the model's own (a GGUF file's general.name, a folder's name; smollm2-135m for the bundled model).", ())
    model_path: str = _f("", "Local Hugging Face folder or .gguf file. Empty: the bundled SmolLM2-135M-Instruct.", ("model",))
    preset: str = _f("auto", "Where settings left at -1 / empty come from: auto (the bundled model's tuned section, or for any other model the recipe that transfers, with depth-relative layers) or paper (the paper's presets for Llama-2-7B, as published).",
                 ("stage1", "stage2_only", "task_lora", "oppu"), choices=("auto", "paper"))
    cuda_device: int = _f(0, "GPU index when CUDA is present; ignored (with a notice) on CPU-only machines.", (), min=0, run_override=True)
    dtype: str = _f("auto", "Backbone dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16 (float64: exact arithmetic, for checks).", ("model",),
                    choices=DTYPES, run_override=True)
    seed: int = _f(42, "Seed for initialisation, data order and generated data.", DATA)
    batch_size: int = _f(8, "Examples per optimisation step (stage 2: per user per step).",
                         ("stage1", "users", "stage2_only", "task_lora", "oppu"), min=1)
    eval_batch_size: int = _f(32, "Queries per generation batch (users mixed freely).", (), min=1, run_override=True)
    low_rank_dimension: int = _f(-1, "Rank of the collective shift (LRank); 0: no collective shift. -1: task preset.",
                                 ("stage1", "stage2_only"), min=-1)
    user_low_rank_dimension: int = _f(-1, "Rank of each personal shift (ULRank). -1: task preset.", ("stage1", "stage2_only"), min=-1)
    intervene_layer: str = _f("", "Decoder layers to shift, ';'-separated: absolute indices ('14;15') or fractions of the model's depth ('14/32;15/32' or '0.44;0.47': layer floor(f * depth), collisions moved up), resolved when the model is loaded. Empty: task preset.", ("stage1", "stage2_only"))
    positions: str = _f("", "Prompt positions to shift: fN, lN or fN+lM. Empty: task preset.", ("stage1", "stage2_only"))
    max_epoch: int = _f(-1, "Epochs of stage 2 (and of stage 1 unless stage1_epochs is set). -1: task preset.",
                        ("users", "stage2_only", "oppu"), min=-1)
    stage1_epochs: int = _f(-1, "Epochs of stage 1 (0: the collective shift stays as initialised). -1: preset, else the same as max_epoch.",
                            ("stage1", "task_lora"), min=-1)
    shift_init: str = _f("", "Initial shifts: loreft (pyreft's random W, b) or zero (W = R, b = 0: each shift starts as the identity). Empty: preset, else loreft.",
                         ("stage1", "stage2_only"), choices=("", "loreft", "zero"))
    lr: float = _f(2e-3, "AdamW learning rate of stage 1 (no weight decay: it stalls these tiny modules).", ("stage1",), min=0)
    user_lr: float = _f(-1.0, "AdamW learning rate of stage 2. -1: preset, else 2e-3.", ("users", "stage2_only"), min=-1)
    early_stopping: int = _f(-1, "Stage 2: each user's last N history items become its validation set; the user's shift at its best validation loss is kept, and it stops after `patience` epochs without improvement (0: off; -1: preset, else off).",
                             ("users", "stage2_only"), min=-1)
    patience: int = _f(2, "Early stopping: epochs without a better validation loss before a user stops.", ("users", "stage2_only"), min=1)
    max_users: int = _f(0, "Use only the first N test users (0: all). Each user's shift does not depend on the others.", ("predictions",), min=0, run_override=True)
    max_stage1_examples: int = _f(0, "Use at most N stage-1 examples, taken evenly across users (0: all).", ("stage1_data",), min=0)
    holdout: int = _f(0, "Tuning mode: each test user's last N history items become its queries and the rest its history; the real queries are never used. 0: off.", ("test_data",), min=0)
    max_history: int = _f(0, "Train each test user on at most their N latest history items (0: all).", ("test_data",), min=0)
    query_cue: int = _f(1, "1: a query input that lacks the template's answer cue (' category:', ' headline:') gets it, as history prompts end (LaMP's official inputs stop before it); 0: inputs exactly as given.",
                        DATA, choices=(0, 1))
    max_field_words: int = _f(768, "Truncate each text field of a prompt to this many words (OPPU: 768; 0: no limit).", DATA, min=0)
    max_length: int = _f(2048, "Truncate prompt+target to this many tokens, keeping the end of the prompt (must exceed the task's answer length).", DATA, min=2)
    rows_per_pass: int = _f(32, "Training rows per forward pass (a step's per-user batches are packed up to this; larger suits a GPU). At least batch_size.", (), min=1)
    user_group_size: int = _f(32, "Stage 2 trains this many users at once in one batched loop; each group is stored when done.", (), min=1)
    cache_max_bytes: int = _f(2 * 1024**3, "Bound on the in-memory cache of frozen states; beyond it they go to a memory-mapped file on disk.", (), min=0)
    disk_cache_max_bytes: int = _f(32 * 1024**3, "Bound on the memory-mapped disk cache of frozen states (0: none); beyond it they are recomputed each epoch.", (), min=0)
    disk_cache_dir: str = _f("", "Folder of the memory-mapped state cache (its file is unlinked at once). Empty: <run dir>/cache.", ())
    prompts_file: str = _f("", "JSON file of prompt templates replacing the packaged configs/prompts.json (its content counts, not its path).", DATA)
    allow_overlap: int = _f(0, "Test users, their query ids or query texts found in the training data: 0 an error; 1 kept, warned; "
                               "2 left out of training (the items, queries or users named), warned.", (), choices=(0, 1, 2))
    overwrite: int = _f(0, "1: a run dir whose stage-1 checkpoint or user store was made with other settings or data is retrained and replaced (an error otherwise).", (), choices=(0, 1))
    zero_shot: int = _f(1, "1: `perfit run` also answers with the bare model (the zero_shot row of results.json); 0: "
                        "only stage1 and perfit (a time budget drops it first: it costs PerFit nothing).", (), choices=(0, 1))
    time_budget: str = _f("auto", "Wall time the run may take (20m, 2h, 1h30m, none). Before any work the run is planned "
                          "from a timed pass over a few of its own examples; what does not fit is cut in one order (stage-1 "
                          "the zero_shot row, stage-1 examples, stage-1 epochs, oldest history, stage-2 epochs; docs/performance.md), each cut logged "
                          "and kept in results.json. auto: 20m on a CPU, none on a GPU. A run that fits is unchanged.", ())
    personalize: str = _f("train", "How a user's personal shift is made: train (stage 2 on the user's history), instant (the "
                          "shift generator, one forward pass over the history, no training) or instant+train (stage 2 "
                          "started from the generated shift, for --warm_epochs). instant modes need the generator.",
                          ("users",), choices=PERSONALIZE_MODES)
    warm_epochs: int = _f(-1, "instant+train: stage-2 epochs from the generated shift. -1: a quarter of max_epoch (at least 1).",
                          ("users",), min=-1)
    generator: int = _f(-1, "Learn the shift generator after stage 1 (from the stage-1 users only): 1 yes, 0 no, -1 when "
                        "--personalize is instant or instant+train. Generated data then gets at least "
                        "GENERATOR_MIN_USERS stage-1 users.", ("generator",), choices=(-1, 0, 1))
    gen_width: int = _f(128, "Shift generator: hidden width of its MLP.", ("generator",), min=1)
    gen_dropout: float = _f(0.1, "Shift generator: dropout on its input and hidden layer while it trains.", ("generator",), min=0)
    gen_lr: float = _f(1e-4, "Shift generator: AdamW learning rate.", ("generator",), min=0)
    gen_weight_decay: float = _f(0.01, "Shift generator: AdamW weight decay.", ("generator",), min=0)
    gen_epochs: int = _f(12, "Shift generator: most epochs over the stage-1 users (the best on held-out users is kept).",
                         ("generator",), min=1)
    gen_patience: int = _f(3, "Shift generator: epochs without a better held-out loss before it stops.", ("generator",), min=1)
    gen_targets: int = _f(4, "Shift generator: items of each episode's user whose loss trains it (the rest are the profile it reads).",
                          ("generator",), min=1)
    gen_users_per_step: int = _f(8, "Shift generator: users (episodes) per optimisation step.", ("generator",), min=1)
    gen_holdout_fraction: float = _f(0.15, "Shift generator: share of stage-1 users held out of its training to choose its epoch.",
                                     ("generator",), min=0)
    num_users: int = _f(20, "Generated data only: test users.", DATA, min=1)
    num_other_users: int = _f(12, "Generated data only: stage-1 (other) users.", DATA, min=0)
    history_per_user: int = _f(20, "Generated data only: history items per user.", DATA, min=1)
    queries_per_user: int = _f(5, "Generated data only: queries per user.", DATA, min=1)

    def resolved(self) -> "RunConfig":
        """Check every field and fill preset values (-1 / empty) from the task preset. Raises ConfigError naming the flag."""
        check_fields(self)
        try:
            task = get_task(self.task_name)
        except ValueError as e:
            raise ConfigError(f"--task_name: {e}") from None
        p = preset(self.task_name, self.model_path, self.preset)
        c = dataclasses.replace(self)
        if not c.model_name:
            from .backbone import model_name_of

            c.model_name = model_name_of(c.model_path)
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
            c.stage1_epochs = int(p.get("stage1_epochs", c.max_epoch))
        if getattr(c, "oppu_epochs", 0) < 0:
            c.oppu_epochs = int(p.get("oppu_epochs", c.max_epoch))
        for name, fallback in PRESET_FALLBACKS.items():  # settings only a model's own preset section sets
            if hasattr(c, name) and getattr(c, name) in (-1, ""):
                setattr(c, name, type(fallback)(p.get(name, fallback)))
            if isinstance(fallback, (int, float)) and getattr(c, name, 0) < 0:
                raise ConfigError(f"--{name} must be >= 0 (or -1: preset), got {getattr(c, name)}")
        if c.user_low_rank_dimension < 1:
            raise ConfigError(f"--user_low_rank_dimension must be >= 1, got {c.user_low_rank_dimension}")
        if c.max_epoch < 1:
            raise ConfigError(f"--max_epoch must be >= 1, got {c.max_epoch}")
        if c.warm_epochs < 0:
            c.warm_epochs = max(1, c.max_epoch // 4)
        if c.generator < 0:
            c.generator = int(c.personalize != "train")
        if c.personalize != "train" and not c.generator:
            raise ConfigError(f"--personalize {c.personalize} needs the shift generator; drop --generator 0")
        if c.generator and not c.data_dir and c.num_other_users < GENERATOR_MIN_USERS:
            import logging

            logging.getLogger("perfit").info("shift generator on: generated data gets %d stage-1 users (--num_other_users "
                                             "was %d)", GENERATOR_MIN_USERS, c.num_other_users)
            c.num_other_users = GENERATOR_MIN_USERS
        parse_budget(c.time_budget, False)
        c.intervene_layer = ";".join(str(l) for l in parse_layer_spec(c.intervene_layer))  # one spelling per layer set
        try:
            parse_positions(c.positions)
        except ValueError as e:
            raise ConfigError(f"--positions: {e}") from None
        if c.max_length <= task.max_new_tokens:
            raise ConfigError(f"--max_length {c.max_length} must exceed the {task.name} answer length "
                              f"(max_new_tokens {task.max_new_tokens})")
        if c.rows_per_pass < c.batch_size:
            raise ConfigError(f"--rows_per_pass {c.rows_per_pass} must be at least --batch_size {c.batch_size} "
                              f"(one user's batch runs in one pass)")
        return c

    @property
    def layers(self) -> list[int]:
        return parse_layers(self.intervene_layer)

    def default_run_dir(self) -> str:
        """The seed's readable name plus a hash of every setting that changes the stage-1 checkpoint or the users'
        shifts, so runs that differ in any of them (learning rates included) never share a folder."""
        il = self.intervene_layer.replace(";", ".").replace("/", "of")
        return (f"lr={self.low_rank_dimension}_ulr={self.user_low_rank_dimension}_il={il}_pl={self.positions}"
                f"_ep={self.max_epoch}_bs={self.batch_size}_seed={self.seed}_model={self.model_name}"
                f"_{artifact_keys(self)['users'][:8]}")


CPU_BUDGET_S = 20 * 60  # --time_budget auto on a CPU: a whole `perfit run` in about 20 minutes


def parse_budget(text: str, on_gpu: bool) -> float | None:
    """'20m', '2h', '1h30m', '90s', 'none' (or '0') -> seconds or None; 'auto': 20 minutes on a CPU, none on a GPU."""
    import re

    t = text.strip().lower()
    if t == "auto":
        return None if on_gpu else float(CPU_BUDGET_S)
    if t in ("none", "0", ""):
        return None
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", t)
    if not m or not any(m.groups()):
        raise ConfigError(f"--time_budget {text!r}: give a duration such as 20m, 2h, 1h30m or 90s, or none / auto")
    h, mi, sec = (float(g or 0) for g in m.groups())
    return h * 3600 + mi * 60 + sec


def parse_positions(spec: str) -> tuple[int, int]:
    """'f7+l7' -> (7, 7); 'l7' -> (0, 7); 'f5' -> (5, 0)."""
    import re

    m = re.match(r"^(?:f(\d+))?(?:\+?l(\d+))?$", spec.strip()) if spec else None
    if not m or (m.group(1) is None and m.group(2) is None) or (m.group(1) and m.group(2) and "+" not in spec):
        raise ValueError(f"positions must look like fN, lN or fN+lM (e.g. 'f7+l7'), got {spec!r}")
    first, last = int(m.group(1) or 0), int(m.group(2) or 0)
    if first + last == 0:
        raise ValueError(f"positions {spec!r} selects no token")
    return first, last


def check_fields(cfg) -> None:
    """Types, lower bounds and choices of every field, before any work. Raises ConfigError naming the flag."""
    for f in dataclasses.fields(cfg):
        v, md = getattr(cfg, f.name), f.metadata
        typ = type(f.default)
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
            setattr(cfg, f.name, v)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise ConfigError(f"--{f.name} must be {typ.__name__}, got {v!r}")
        if md.get("min") is not None and v < md["min"]:
            raise ConfigError(f"--{f.name} must be >= {md['min']:g}, got {v}")
        if md.get("choices") and v not in md["choices"]:
            shown = ", ".join(str(c) for c in md["choices"] if c != "")  # "" (preset) is the default, not a choice to offer
            raise ConfigError(f"--{f.name} {v!r}: choose from {shown}")


METHODS = ("user_majority", "global_majority", "zero_shot", "rag", "task_lora", "oppu", "stage1", "perfit", "perfit_instant",
           "perfit_warm", "perfit_stage2_only")
GENERATOR_METHODS = ("perfit_instant", "perfit_warm")
DEFAULT_METHODS = ",".join(m for m in METHODS if m not in GENERATOR_METHODS)  # the generator's are asked for by name
# what each comparison record is computed from (besides the `predictions` settings)
RECORD_INPUTS = {
    "user_majority": ("test_data",), "global_majority": ("stage1_data", "test_data"), "zero_shot": ("model", "test_data"), "rag": ("model", "test_data", "rag"),
    "task_lora": ("task_lora", "test_data"), "oppu": ("oppu",), "stage1": ("stage1", "test_data"),
    "perfit": ("users",), "perfit_stage2_only": ("stage2_only",),
    "perfit_instant": ("users", "generator"), "perfit_warm": ("users", "generator"),
}


@dataclass
class CompareConfig(RunConfig):
    methods: str = _f(DEFAULT_METHODS, "Comma-separated methods to run, from: " + ", ".join(METHODS) + " (the default: "
                      "all but perfit_instant and perfit_warm, and global_majority only on tasks with labels).", ())
    output_dir: str = _f("compare", "Folder of comparison.{json,md,png}, methods/*.json and every method's checkpoints.", ())
    rag_k: int = _f(2, "rag: history items retrieved into each prompt.", ("rag",), min=0)
    rag_item_words: int = _f(64, "rag: words kept of each text field of a retrieved item.", ("rag",), min=1)
    lora_rank: int = _f(8, "task_lora / oppu: LoRA rank (OPPU: 8).", ("task_lora",), min=1)
    lora_alpha: int = _f(16, "task_lora / oppu: LoRA alpha.", ("task_lora",), min=1)
    lora_targets: str = _f("q_proj,v_proj", "task_lora / oppu: modules that get LoRA (OPPU: q and v projections).", ("task_lora",))
    lora_lr: float = _f(1e-3, "task_lora: AdamW learning rate (same epochs as stage 1).", ("task_lora",), min=0)
    oppu_lr: float = _f(-1.0, "oppu: per-user AdamW learning rate. -1: preset, else 1e-3.", ("oppu",), min=-1)
    oppu_epochs: int = _f(-1, "oppu: per-user epochs. -1: preset, else max_epoch (PerFit's stage-2 epochs).", ("oppu",), min=-1)
    isolate: int = _f(1, "1: each method in its own process (own peak memory); 0: all in this process.", (), choices=(0, 1))
    reference: str = _f("", "Method every other row of comparison.md is compared with, query by query (mean paired difference of the primary metric and its standard error). Empty: user_majority for classification, zero_shot for generation, when it is among the methods.", ())

    def resolved(self) -> "CompareConfig":
        """As RunConfig's; a comparison with a generator method learns the generator (so every method sees the same
        data, generated with enough stage-1 users)."""
        c = dataclasses.replace(self)
        if c.generator < 0 and any(m.strip() in GENERATOR_METHODS for m in c.methods.split(",")):
            c.generator = 1
        return RunConfig.resolved(c)

    def method_list(self) -> list[str]:
        ms = [m.strip() for m in self.methods.split(",") if m.strip()]
        bad = [m for m in ms if m not in METHODS]
        if bad or not ms:
            raise ConfigError(f"--methods: unknown methods {bad}; choose from {', '.join(METHODS)}")
        if "global_majority" in ms and not get_task(self.task_name).has_labels:
            if self.methods != DEFAULT_METHODS:
                raise ConfigError(f"--methods global_majority: {self.task_name} answers free text, it has no label to answer always")
            ms.remove("global_majority")
        if self.reference and self.reference not in ms:
            raise ConfigError(f"--reference {self.reference}: not among --methods ({', '.join(ms)})")
        return ms

    def record_key(self, method: str, fingerprints: dict[str, str] | None = None) -> str:
        keys = artifact_keys(self, fingerprints)
        return _hash({a: keys[a] for a in RECORD_INPUTS[method] + ("predictions",)})


# what `perfit predict --run_dir` (PerFitModel.from_run's overrides) can change on a finished run: the fields declared
# run_override (users are checked to be trained on the history of the data they predict for)
RUN_OVERRIDES = tuple(f.name for f in dataclasses.fields(RunConfig) if f.metadata["run_override"])


def check_run_overrides(cfg, given: dict, where: str) -> dict:
    """The fields of `given` that differ from the finished run's `cfg`, refused (ConfigError naming the first flags)
    unless they are among RUN_OVERRIDES: any other setting would change what the run trained or stored."""
    changed = {k: v for k, v in given.items() if getattr(cfg, k) != v}
    bad = [k for k in changed if k not in RUN_OVERRIDES]
    if bad:
        raise ConfigError(f"{', '.join('--' + k for k in bad[:4])}: cannot be applied to the finished run {where} "
                          f"(it would change what the run trained); with --run_dir only "
                          f"{', '.join('--' + k for k in RUN_OVERRIDES)} apply. Start a new run for other settings")
    return changed


def affects(cls=CompareConfig) -> dict[str, tuple[str, ...]]:
    """{field: artifacts it affects directly}."""
    return {f.name: f.metadata["affects"] for f in dataclasses.fields(cls)}


def upstream(artifact: str) -> set[str]:
    """The artifacts `artifact` is built from, itself included."""
    out, todo = set(), [artifact]
    while todo:
        a = todo.pop()
        if a not in out:
            out.add(a)
            todo.extend(ARTIFACTS[a])
    return out


def fields_affecting(artifact: str, cls=None) -> list[str]:
    """The fields whose change changes `artifact` (declared on it or on what it is built from), in declaration order:
    what a saved artifact records of its settings, so a refusal can name the field that differs."""
    ups = upstream(artifact)
    return [f.name for f in dataclasses.fields(cls or RunConfig) if set(f.metadata["affects"]) & ups]


def downstream(artifacts) -> set[str]:
    """The artifacts built from any of `artifacts`, themselves included."""
    out = set(artifacts)
    for a, parents in ARTIFACTS.items():  # topological order: one pass suffices
        if out & set(parents):
            out.add(a)
    return out


def artifact_keys(cfg, fingerprints: dict[str, str] | None = None) -> dict[str, str]:
    """{artifact: key}. An artifact's key hashes the fields declared to affect it, its parents' keys and its data
    fingerprint (`fingerprints[artifact]`, e.g. the identity of user_others.json for stage1_data)."""
    fps = fingerprints or {}
    decl = affects(type(cfg))
    keys: dict[str, str] = {}
    for a, parents in ARTIFACTS.items():
        own = {k: getattr(cfg, k) for k, arts in decl.items() if a in arts}
        keys[a] = _hash({"fields": own, "parents": {p: keys[p] for p in parents}, "data": fps.get(a, "")})
    return keys


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def parse_layer_spec(spec: str) -> list:
    """'14;15' -> [14, 15]; '14/32;0.5' -> [Fraction(7, 16), Fraction(1, 2)] (fractions of the model's depth, in [0, 1));
    sorted, distinct. Raises ConfigError naming the flag."""
    from fractions import Fraction

    out = []
    for x in (x.strip() for x in str(spec).replace(",", ";").split(";")):
        if not x:
            continue
        try:
            v = int(x) if x.isdigit() else Fraction(x)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"--intervene_layer must be ';'-separated layer indices ('14;15') or fractions of depth "
                              f"('14/32;15/32', '0.45;0.5'), got {spec!r}") from None
        if isinstance(v, Fraction) and not 0 <= v < 1:
            raise ConfigError(f"--intervene_layer {spec!r}: {x} is neither a layer index nor a fraction of depth in [0, 1)")
        out.append(v)
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"--intervene_layer must list distinct layers, got {spec!r}")
    return sorted(out, key=lambda v: (not isinstance(v, int), v))


def is_relative(spec: str) -> bool:
    return any(not isinstance(v, int) for v in parse_layer_spec(spec))


def resolve_layers(spec: str, num_layers: int) -> list[int]:
    """The absolute layers of a spec on a model of `num_layers` decoder layers: a fraction f is layer floor(f * depth);
    a layer taken already moves to the next free one above it. Raises ConfigError when they do not fit."""
    import math

    want = sorted(v if isinstance(v, int) else math.floor(v * num_layers) for v in parse_layer_spec(spec))
    out: list[int] = []
    for l in want:
        l = max(l, out[-1] + 1) if out else l
        out.append(l)
    bad = [l for l in out if l >= num_layers]
    if bad:
        raise ConfigError(f"intervene_layer {spec} gives layers {out}: out of range, the model has {num_layers} decoder "
                          f"layers (0..{num_layers - 1})")
    return out


def parse_layers(spec: str) -> list[int]:
    """Absolute layers only (a relative spec needs the model: `resolve_layers`)."""
    layers = parse_layer_spec(spec)
    if any(not isinstance(v, int) for v in layers):
        raise ConfigError(f"--intervene_layer {spec!r} is relative to the model's depth; it is resolved once the model "
                          f"is loaded (PerFitModel)")
    return layers


def read_mapping(path: str, flag: str, what: str) -> dict:
    """A JSON or YAML file (by its ending) holding one mapping; a missing, malformed or other file is a ConfigError
    naming the flag and the file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror}") from None
    yaml_file = path.endswith((".yaml", ".yml"))
    try:
        if yaml_file:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - JSONDecodeError / YAMLError: the file is at fault
        raise ConfigError(f"{flag} {path}: not valid {'YAML' if yaml_file else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {path}: expected a mapping of {what}")
    return data


def load_config_file(path: str, cls) -> dict:
    """Settings from a JSON or YAML file of `cls` fields (a run's own config.json works), checked for unknown fields;
    flags given on the command line override them."""
    data = read_mapping(path, "--config", f"{cls.__name__} fields")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"--config {path}: unknown {cls.__name__} fields {unknown}")
    return data


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def run_fields(cfg) -> dict:
    """The `RunConfig` fields of a config (a compare or tune config carries its own besides): what a run dir keeps,
    so that it reloads as a run whichever command made it."""
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return {k: v for k, v in to_dict(cfg).items() if k in names}


def from_dict(cls, d: dict, where: str = ""):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**d)


@dataclass
class ServeConfig:
    """`perfit serve`: one process holds the run's model once and answers many users (nothing here changes a result)."""
    run_dir: str = _f("", "The run to serve (made by `perfit run`, or stage1 + stage2). Required.", ())
    host: str = _f("127.0.0.1", "Address to listen on. Anything but loopback requires --api_key_file.", ())
    port: int = _f(8000, "Port to listen on (0: any free port, printed at start).", (), min=0)
    max_batch_size: int = _f(32, "Requests answered together in one batch (one mixed-user prefill, batched decoding).", (), min=1)
    max_wait_ms: float = _f(10.0, "How long the first request of a batch waits for others to join it.", (), min=0)
    max_cached_users: int = _f(1024, "Users' shifts kept on the device between requests (least recently used go first).", (), min=1)
    api_key_file: str = _f("", "File holding the API key clients must send as 'Authorization: Bearer <key>' (all but /healthz).", ())
    served_model_name: str = _f("perfit", "The model name requests must give in their 'model' field.", ())
    device: str = _f("", "cpu, cuda or cuda:N (default: the run's GPU if CUDA is present).", ())
    dtype: str = _f("", "Backbone dtype (default: the run's); float64 serves the exact arithmetic the tests compare.", (),
                    choices=("",) + DTYPES)
    max_body_bytes: int = _f(1 << 20, "Largest request body accepted (413 beyond).", (), min=1)
    max_tokens: int = _f(256, "Largest max_tokens / max_new_tokens a request may ask for.", (), min=1)
    max_prompt_tokens: int = _f(4096, "Longest prompt accepted, in tokens (also bounded by the run's max_length).", (), min=1)
    max_history_items: int = _f(1000, "Most history items one personalization request may carry.", (), min=1)
    max_queued_requests: int = _f(256, "Generation requests that may wait for a batch (8 batches of 32); beyond, 429 with Retry-After.", (), min=1)
    max_queued_users: int = _f(1024, "Users whose history may wait to be trained; beyond, 429 with Retry-After (a waiting user may post again).", (), min=1)
    request_timeout_s: float = _f(600.0, "A generation request not answered within this many seconds gets 504 (and is dropped if not yet in a batch); 0: no limit.", (), min=0)
    max_consecutive_failures: int = _f(3, "Generation batches failing in a row after which the worker is deemed unable to go on: /healthz says 503 and the server exits with code 3.", (), min=1)
    max_lifetime_s: float = _f(0.0, "Stop (gracefully) after this many seconds; 0: run until stopped. For tests and benchmarks.", (), min=0)
    personalize: str = _f("", "How a posted history becomes the user's shift: train, instant (the run's shift generator: "
                          "the user is ready when the post returns) or instant+train (ready at once, then refined by "
                          "training). Empty: the run's --personalize.", (), choices=("",) + PERSONALIZE_MODES)
    trainer: str = _f("process", "Where training runs: process (a trainer process at the lowest CPU priority beside the "
                      "server, with its own copy of the backbone: generation never waits for training) or inline (in "
                      "the server's worker, between generation batches: one copy of the model, but a training group "
                      "stalls every request until it is done).", (), choices=("process", "inline"))
    trainer_nice: int = _f(19, "CPU priority (nice) of the trainer process: 19 trains only on CPU that generation leaves "
                           "idle (under sustained load refinements wait); lower trains sooner and slows generation more.",
                           (), min=0)
    instant_items_per_turn: int = _f(8, "History items whose features the worker computes between two generation "
                                     "batches while users' instant shifts are made (bounds what a post costs others).",
                                     (), min=1)
    engine: str = _f("embedded", "embedded: PerFit's own server (one process, online personalization endpoints); vllm: vLLM's "
                     "OpenAI-compatible server with the PerFit plugin (continuous batching, paged KV cache; needs "
                     "perfit[vllm]). With vllm, the flags above that vLLM has are passed to it and the others ignored.",
                     (), choices=("embedded", "vllm"))
    vllm_args: str = _f("", "More vLLM server flags, one string, given with = (--vllm_args='--max-num-seqs 64 --no-enable-prefix-caching').", ())
