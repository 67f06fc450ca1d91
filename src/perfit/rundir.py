"""A run dir on disk: its layout, its config, the stage-1 checkpoint (written so that it is whole at every moment) and
the state of an unfinished stage 1, and the user store's place. No model here: the vLLM plugin's scheduler side and
`perfit forget` read a run without one.

    <run dir>/config.json              the RunConfig (depth-relative layers made absolute)
    <run dir>/prompts.json             the templates used
    <run dir>/task_reft/ckpt/          a `save_pretrained` folder (perfit.method.io): collective.safetensors (the
                                       collective shift and P0; the PerFitConfig and the stage-1 record in its
                                       metadata), perfit_config.json, and stage1.json (a readable copy of the record)
    <run dir>/task_reft/stage1_state.safetensors   only while stage 1 is unfinished
    <run dir>/task_reft/generator.safetensors      the shift generator, its config and report in its metadata
    <run dir>/users.sqlite             one personal shift per user (perfit.store)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

from .config import CompareConfig, RunConfig, from_dict, is_relative, resolve_layers
from .data import write_json_atomic
from .errors import RunStateError
from .faults import fault_point
from .method import io as method_io
from .method.config import PerFitConfig
from .method.io import COLLECTIVE_NAME
from .method.shifts import Shifter
from .store import UserStore, save_safetensors_atomic

log = logging.getLogger("perfit")
CONFIG_FILE = "config.json"
PROMPTS_FILE = "prompts.json"
CKPT = os.path.join("task_reft", "ckpt")
CKPT_TENSORS, CKPT_RECORD = COLLECTIVE_NAME, "stage1.json"
PARTIAL = os.path.join("task_reft", "stage1_state.safetensors")  # stage 1 in progress
GENERATOR = os.path.join("task_reft", "generator.safetensors")  # the shift generator (instant personalization)
USERS = "users.sqlite"


def load_run_config(run_dir: str) -> RunConfig:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunStateError(f"{path}: not a PerFit run dir (no {CONFIG_FILE}); make one with `perfit run` or `perfit stage1`")
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    # run dirs `perfit compare` made before it saved only the run's fields: its own fields do not change a run
    compare_only = {f.name for f in dataclasses.fields(CompareConfig)} - {f.name for f in dataclasses.fields(RunConfig)}
    return from_dict(RunConfig, {k: v for k, v in d.items() if k not in compare_only}, where=path)


def resolve_for_model(cfg: RunConfig, num_layers: int) -> RunConfig:
    """The config with depth-relative layers (`--intervene_layer 14/32;15/32`) made absolute for this model: what the
    run dir saves and every key is derived from, so that it reloads and compares as the layers it shifted."""
    if not is_relative(cfg.intervene_layer):
        return cfg
    layers = resolve_layers(cfg.intervene_layer, num_layers)
    log.info("intervene_layer %s: layers %s of %d", cfg.intervene_layer, ";".join(map(str, layers)), num_layers)
    return dataclasses.replace(cfg, intervene_layer=";".join(map(str, layers)))


# ---------------------------------------------------------------- the stage-1 checkpoint

def has_checkpoint(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, CKPT_TENSORS))


def artifact_key(path: str, field: str) -> str | None:
    """The key a saved safetensors artifact (a stage-1 checkpoint's tensors, a generator) was made with, from its
    metadata alone (None: no such file or key)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        return None
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    return meta.get(field) or json.loads(meta.get("meta", "{}")).get(field)


def load_collective(ckpt_dir: str) -> tuple[Shifter, dict]:
    """A stage-1 checkpoint on its own: the collective shift and P0 with the record of the stage 1 that made them (its
    `meta`), from the one file that is replaced atomically."""
    if not has_checkpoint(ckpt_dir):
        raise RunStateError(f"{ckpt_dir}: no stage-1 checkpoint; run `perfit stage1` (or `perfit run`) first")
    try:
        sh, _, extra = method_io.load_collective(ckpt_dir)
        meta = json.loads(extra["meta"])
    except (ValueError, KeyError) as e:
        raise RunStateError(f"{ckpt_dir}: not a stage-1 checkpoint ({type(e).__name__}: {e})") from None
    return sh, meta


def load_collective_from(meta: dict, tensors: dict) -> tuple[Shifter, dict]:
    """The stage-1 shifter from its record and tensors (what torchrun ranks exchange)."""
    return method_io.shifter_from(PerFitConfig.from_dict(meta["perfit_config"]), tensors, "stage-1 shifts"), meta


def write_checkpoint(run_dir: str, sh: Shifter, meta: dict) -> None:
    """One file replaced in one rename (tensors with their config and record in its metadata): at every moment the
    checkpoint is the old one or the new one, never none and never a mix."""
    ckpt = os.path.join(run_dir, CKPT)
    pc = PerFitConfig.from_dict(meta["perfit_config"])
    method_io.save_collective(ckpt, pc, sh, {"stage1_key": meta["stage1_key"], "meta": json.dumps(meta)})
    fault_point("stage1.ckpt_swap")
    write_json_atomic(os.path.join(ckpt, CKPT_RECORD), meta)


def load_partial(path: str, key: str):
    """The saved state of an interrupted stage 1, if it was made with this stage-1 key."""
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open

    from .train.loop import TrainState

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if meta.get("stage1_key") != key:
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return TrainState(int(meta["step"]), tensors, json.loads(meta["stats"]))


def save_partial(path: str, key: str, state) -> None:
    meta = {"stage1_key": key, "step": str(state.step), "stats": json.dumps(state.stats)}
    save_safetensors_atomic(path, state.tensors, meta)


def write_generator(path: str, gen, meta: dict) -> None:
    """The shift generator in one file replaced in one rename (its spec and what made it in the metadata)."""
    from .method.generator import save_generator

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_generator(path, gen, meta, save_safetensors_atomic)


def read_generator(path: str):
    from .method.generator import load_generator

    try:
        return load_generator(path)
    except ValueError as e:
        raise RunStateError(str(e)) from None


def config_diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) & set(b) if a.get(k) != b.get(k) and k not in ("output_dir", "run_dir_name"))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:5]) or "same settings, other data"


# ---------------------------------------------------------------- the user store

def store_path(run_dir: str) -> str:
    """Where a run's user store is."""
    return os.path.join(run_dir, USERS)


def run_store(run_dir: str) -> UserStore:
    """A run's user store on its own (no model), or a clear error (no run dir; a store in the earlier layout)."""
    load_run_config(run_dir)
    return UserStore(store_path(run_dir))


def forget_user(run_dir: str, user_id: str) -> bool:
    """`PerFitModel.forget` without loading a model (what `perfit forget` runs)."""
    return run_store(run_dir).delete(user_id)
