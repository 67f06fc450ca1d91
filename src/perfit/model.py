"""`PerFitModel`: a frozen backbone, the collective shift (stage 1) and the store of personal shifts (stage 2) of one
run. The one core that every command, the server and the benchmarks use, in the manner of peft's `PeftModel`:

    pm = PerFitModel.from_run("output/movie_tagging/<run_dir>")       # no data files, no command line
    pm.generate(["u0001", "new-user"], ["description: ... tag:", "..."])  # many users in one batch
    pm.personalize({"new-user": [history items]})                     # batched stage 2, stored atomically
    pm.forget("new-user")

A run dir holds `config.json` (the RunConfig), `prompts.json` (the templates used), `task_reft/ckpt/` (the
collective shift and the initial personal shift P0, with the config and data identity that made them) and
`users.sqlite` (one personal shift per user).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors.torch import load_file

from .backbone import Backbone, check_layers, load_backbone
from .batching import tokenize_examples, tokenize_prompt
from .config import (CompareConfig, RunConfig, artifact_keys, check_run_overrides, from_dict, is_relative, parse_positions,
                     resolve_layers, run_fields)
from .data import DataError, validate_items, write_json_atomic
from .errors import RunStateError
from . import dist
from .faults import fault_point
from .generate import GenerationOutput, greedy_generate
from .prompts import Example, PromptBuilder
from .shifts import Shifter
from .store import UserStore, history_digest, legacy_store_message, save_safetensors_atomic
from .store import remove_files as remove_store_files
from .tasks import get_task
from .train import TrainStats, train_shifts
from .train.forward import mean_loss
from .train.loop import TrainState

log = logging.getLogger("perfit")
CONFIG_FILE = "config.json"
PROMPTS_FILE = "prompts.json"
CKPT = os.path.join("task_reft", "ckpt")
PARTIAL = os.path.join("task_reft", "stage1_state.safetensors")  # stage 1 in progress
USERS = "users.sqlite"
LEGACY_USERS = "users"
VARIANTS = ("zero_shot", "stage1", "perfit")


class Generations(list):
    """Generated texts in input order; `without_personal_shift` names the users that had no stored shift and got
    the stage-1 shifts (the collective shift and the initial personal shift P0 every user starts from)."""

    def __init__(self, texts, without_personal_shift=()):
        super().__init__(texts)
        self.without_personal_shift = list(without_personal_shift)


PROBE_EXAMPLES = 64
MIN_FALL = 0.05  # stage 1 "learned" when the loss on its fixed probe items fell by at least this fraction


def stage1_learning(before: float | None, after: float | None, n: int, cfg: RunConfig) -> dict:
    """Whether stage 1 learned: its loss on `n` fixed training items before and after training, and, when it fell by
    less than MIN_FALL, a message saying so and what to try."""
    out = {"probe_examples": n, "loss_before": before, "loss_after": after, "min_fall": MIN_FALL}
    if before is None or after is None or cfg.stage1_epochs == 0:
        return out | {"relative_fall": None, "learned": True, "message": ""}
    fall = 1.0 - after / before if before > 0 else 0.0
    learned = fall >= MIN_FALL
    msg = "" if learned else (
        f"stage 1 learned little: its loss on {n} of its training items went from {before:.4f} to {after:.4f} "
        f"({-100 * fall:+.1f} %, less than a {100 * MIN_FALL:.0f} % fall), so the personal shifts start from a collective "
        f"shift that does next to nothing. Try a larger --lr (now {cfg.lr:g}) or --stage1_epochs (now "
        f"{cfg.stage1_epochs}), --shift_init zero, or other layers (--intervene_layer {cfg.intervene_layer}; fractions "
        f"of depth such as 0.7;0.85 carry across models)")
    return out | {"relative_fall": round(fall, 4), "learned": learned, "message": msg}


def resolve_for_model(cfg: RunConfig, num_layers: int) -> RunConfig:
    """The config with depth-relative layers (`--intervene_layer 14/32;15/32`) made absolute for this model: what the
    run dir saves and every key is derived from, so that it reloads and compares as the layers it shifted."""
    if not is_relative(cfg.intervene_layer):
        return cfg
    layers = resolve_layers(cfg.intervene_layer, num_layers)
    log.info("intervene_layer %s: layers %s of %d", cfg.intervene_layer, ";".join(map(str, layers)), num_layers)
    return dataclasses.replace(cfg, intervene_layer=";".join(map(str, layers)))


def load_run_config(run_dir: str) -> RunConfig:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise RunStateError(f"{path}: not a PerFit run dir (no {CONFIG_FILE}); make one with `perfit run` or `perfit stage1`")
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    # run dirs `perfit compare` made before it saved only the run's fields: its own fields do not change a run
    compare_only = {f.name for f in dataclasses.fields(CompareConfig)} - {f.name for f in dataclasses.fields(RunConfig)}
    return from_dict(RunConfig, {k: v for k, v in d.items() if k not in compare_only}, where=path)


def _to_bytes(obj):
    """Tensors inside `obj` (a TrainState, or a trained group) as safetensors bytes, to cross a process group."""
    from safetensors.torch import save

    if obj is None:
        return None
    if isinstance(obj, TrainState):
        return ("state", obj.step, save(obj.tensors), obj.stats)
    tensors_of, info = obj
    return ("group", {u: save({k: v.cpu() for k, v in t.items()}) for u, t in tensors_of.items()}, info)


def _from_bytes(obj):
    from safetensors.torch import load

    if obj is None:
        return None
    if obj[0] == "state":
        return TrainState(obj[1], load(obj[2]), obj[3])
    return {u: load(b) for u, b in obj[1].items()}, obj[2]


def _load_partial(path: str, key: str) -> TrainState | None:
    """The saved state of an interrupted stage 1, if it was made with this stage-1 key."""
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        if meta.get("stage1_key") != key:
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return TrainState(int(meta["step"]), tensors, json.loads(meta["stats"]))


CKPT_TENSORS, CKPT_CONFIG = "shifts.safetensors", "config.json"


def has_checkpoint(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, CKPT_TENSORS))


def load_collective(ckpt_dir: str) -> tuple[Shifter, dict]:
    """A stage-1 checkpoint on its own: the collective shift and P0. The tensors file carries its config in its own
    metadata, so the one file that is replaced atomically says everything (config.json beside it is a readable copy;
    checkpoints written before carry it only there)."""
    from safetensors import safe_open

    path = os.path.join(ckpt_dir, CKPT_TENSORS)
    if not os.path.isfile(path):
        raise RunStateError(f"{ckpt_dir}: no stage-1 checkpoint; run `perfit stage1` (or `perfit run`) first")
    with safe_open(path, "pt") as f:
        own = (f.metadata() or {}).get("meta")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if own is None:
        with open(os.path.join(ckpt_dir, CKPT_CONFIG), encoding="utf-8") as f:
            own = f.read()
    return load_collective_from(json.loads(own), tensors)


def load_collective_from(meta: dict, tensors: dict) -> tuple[Shifter, dict]:
    """The stage-1 shifter from its checkpoint's config and tensors."""
    sc = meta["shift"]
    sh = Shifter(sc["hidden_size"], sc["layers"], sc["low_rank_dimension"], sc["user_low_rank_dimension"], 1, init=None)
    sh.load_state_dict(tensors)
    return sh, meta


class PerFitModel:
    def __init__(self, cfg: RunConfig, backbone: Backbone, run_dir: str, fingerprints: dict[str, str] | None = None,
                 prompts_file: str = "", max_cached_users: int = 1024):
        self.model, self.tok, self.info = backbone
        self.cfg = resolve_for_model(cfg.resolved(), self.info.num_layers)
        check_layers(self.model, self.cfg.layers)
        self.run_dir = run_dir
        self.fingerprints = dict(fingerprints or {})
        self.task = get_task(self.cfg.task_name)
        self.builder = PromptBuilder(self.task, prompts_file or self.cfg.prompts_file or None, self.cfg.max_field_words,
                                     bool(self.cfg.query_cue))
        self.first, self.last = parse_positions(self.cfg.positions)
        self.collective: Shifter | None = None  # collective modules + P0 (one personal module)
        self.stage1_meta: dict = {}
        self._store: UserStore | None = None
        # user -> (version, tensors on the device), least recently used first; a version read from the store decides
        # whether the cached tensors are still the user's
        self._cached: OrderedDict[str, tuple[str, dict[str, torch.Tensor]]] = OrderedDict()
        self.max_cached_users = max_cached_users

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_run(cls, run_dir: str, device: str | None = None, dtype: str | None = None,
                 overrides: dict | None = None, **kw) -> "PerFitModel":
        """Load a finished run: the backbone named in its config, its collective shift and its user store. `device`
        ("cpu", "cuda:0"; None: the run's GPU if CUDA is present, else the CPU) and `dtype` override the run's;
        `overrides` sets RunConfig fields that can change on a finished run (`config.check_run_overrides`)."""
        cfg = load_run_config(run_dir)
        if overrides:
            cfg = dataclasses.replace(cfg, **check_run_overrides(cfg, overrides, run_dir))
        if dtype:
            cfg = dataclasses.replace(cfg, dtype=dtype)
        backbone = load_backbone(cfg.model_path, cfg.dtype, cfg.cuda_device, cfg.model_name, device=device)
        prompts = os.path.join(run_dir, PROMPTS_FILE)
        pm = cls(cfg, backbone, run_dir, prompts_file=prompts if os.path.isfile(prompts) else "", **kw)
        sh, meta = load_collective(os.path.join(run_dir, CKPT))
        pm.fingerprints = meta.get("fingerprints", {})
        pm.set_collective(sh, meta)
        return pm

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def keys(self) -> dict[str, str]:
        return artifact_keys(self.cfg, self.fingerprints)

    def set_collective(self, sh: Shifter, meta: dict) -> None:
        self.collective = sh.to(self.device)
        self.stage1_meta = meta
        self._store = None
        self._cached.clear()

    def _require_collective(self) -> Shifter:
        if self.collective is None:
            raise RunStateError(f"{self.run_dir}: no collective shift yet; fit it (stage 1) first")
        return self.collective

    def save_config(self) -> None:
        """The run's config and templates, so the run dir reloads with `from_run`."""
        write_json_atomic(os.path.join(self.run_dir, CONFIG_FILE), run_fields(self.cfg))
        write_json_atomic(os.path.join(self.run_dir, PROMPTS_FILE), {self.task.name: self.builder.tpl})

    # ------------------------------------------------------------------ stage 1

    def load_collective_if_current(self, overwrite: bool = False) -> bool:
        """Load this run's stage-1 checkpoint if it was made with the current settings and data. A checkpoint made
        otherwise is an error (it would orphan the users trained on it) unless `overwrite`."""
        ckpt = os.path.join(self.run_dir, CKPT)
        if not has_checkpoint(ckpt):
            return False
        sh, meta = load_collective(ckpt)
        if meta.get("stage1_key") == self.keys()["stage1"]:
            self.set_collective(sh, meta)
            return True
        if not overwrite:
            raise RunStateError(f"{ckpt}: the stage-1 checkpoint was made with other settings or data "
                                f"({_config_diff(meta.get('run_config', {}), run_fields(self.cfg))}); "
                                f"use another --run_dir_name, or --overwrite 1 to retrain it and its users")
        return False

    def adopt_collective(self, ckpt_dir: str) -> bool:
        """Reuse another run's stage-1 checkpoint (copied in) when it has this run's stage-1 key."""
        sh, meta = load_collective(ckpt_dir)
        if meta.get("stage1_key") != self.keys()["stage1"]:
            return False
        self._write_checkpoint(sh, meta)
        self.set_collective(sh, meta)
        return True

    def fit_collective(self, examples: list[Example], desc: str = "stage 1", fresh: bool = False) -> TrainStats:
        """Stage 1: the collective shift and the initial personal shift P0 on all `examples` (other users' data),
        saved to the run's checkpoint (atomically: a crash never leaves one that half-loads). The training state is
        saved at the end of every epoch; a run killed on the way resumes from it (unless `fresh`) to the same result."""
        c = self.cfg
        # shifts are float32 (QR in bf16 is unreliable), float64 in a float64 model (the exactness checks)
        dtype = torch.float64 if next(self.model.parameters()).dtype == torch.float64 else torch.float32
        sh = Shifter(self.info.hidden_size, c.layers, c.low_rank_dimension, c.user_low_rank_dimension, 1, c.seed,
                     c.shift_init).to(self.device, dtype)
        ex = tokenize_examples(self.tok, examples, c.max_length)
        for e in ex:
            e.module, e.key = 0, "stage1"
        key = self.keys()["stage1"]
        partial = os.path.join(self.run_dir, PARTIAL)
        resume = None if fresh or not dist.is_main() else _load_partial(partial, key)
        if dist.enabled():  # rank 0 reads the run dir; every rank resumes alike
            resume = _from_bytes(dist.broadcast(_to_bytes(resume)))
        if resume is not None:
            log.info("%s: resuming at step %d from %s", desc, resume.step, partial)

        def save_partial(state: TrainState) -> None:
            if dist.is_main():
                meta = {"stage1_key": key, "step": str(state.step), "stats": json.dumps(state.stats)}
                save_safetensors_atomic(partial, state.tensors, meta)

        probe = ex[:: max(1, len(ex) // PROBE_EXAMPLES)][:PROBE_EXAMPLES]  # fixed items, scored before and after
        with sh.attached(self.model):
            before = mean_loss(self.model, sh, probe, self.tok.pad_token_id, self.first, self.last) if probe else None
            stats = train_shifts(self.model, sh, ex, epochs=c.stage1_epochs, batch_size=c.batch_size, lr=c.lr,
                                 train_collective=True, pad_id=self.tok.pad_token_id, first=self.first, last=self.last,
                                 seed=c.seed, desc=desc, resume=resume, on_epoch=save_partial,
                                 data_parallel=dist.enabled(), **self._train_kw())
            after = mean_loss(self.model, sh, probe, self.tok.pad_token_id, self.first, self.last) if probe else None
        learning = stage1_learning(before, after, len(probe), c)
        log.info("%s: %d examples, %d steps, loss by epoch %s, %.1fs", desc, len(ex), stats.steps,
                 [round(x, 4) for x in stats.epoch_losses], stats.seconds)
        if not learning["learned"]:
            log.warning("%s", learning["message"])
        meta = {"stage1_key": key, "fingerprints": self.fingerprints, "run_config": run_fields(c),
                "shift": {"hidden_size": self.info.hidden_size, "layers": c.layers, "low_rank_dimension": c.low_rank_dimension,
                          "user_low_rank_dimension": c.user_low_rank_dimension, "positions": c.positions},
                "model": dataclasses.asdict(self.info), "learning": learning,
                "examples": len(ex), "train_seconds": stats.seconds, "stats": dataclasses.asdict(stats)}
        if dist.is_main():
            self._write_checkpoint(sh, meta)
            if os.path.exists(partial):
                os.unlink(partial)  # after the checkpoint: a crash in between leaves a complete one, the state unused
        self.set_collective(sh, meta)
        return stats

    def _write_checkpoint(self, sh: Shifter, meta: dict) -> None:
        """One file replaced in one rename (tensors with their config in its metadata): at every moment the checkpoint
        is the old one or the new one, never none and never a mix."""
        ckpt = os.path.join(self.run_dir, CKPT)
        os.makedirs(ckpt, exist_ok=True)
        save_safetensors_atomic(os.path.join(ckpt, CKPT_TENSORS), sh.state_dict(),
                                {"stage1_key": meta["stage1_key"], "meta": json.dumps(meta)})
        fault_point("stage1.ckpt_swap")
        write_json_atomic(os.path.join(ckpt, CKPT_CONFIG), meta)

    def _train_kw(self) -> dict:
        c = self.cfg
        return dict(max_rows=c.rows_per_pass, cache_max_bytes=c.cache_max_bytes, disk_cache_max_bytes=c.disk_cache_max_bytes,
                    disk_cache_dir=c.disk_cache_dir or os.path.join(self.run_dir, "cache"))

    # ------------------------------------------------------------------ the user store

    def store_config(self) -> dict:
        c = self.cfg
        return {"key": self.keys()["users"], "stage1_key": self.keys()["stage1"],
                "settings": {k: getattr(c, k) for k in ("task_name", "user_lr", "max_epoch", "batch_size", "seed",
                                                         "max_history", "holdout", "low_rank_dimension",
                                                         "user_low_rank_dimension", "intervene_layer", "positions")}}

    def open_store(self, overwrite: bool = False) -> UserStore:
        """The run's user store, checked against the current settings (a store made otherwise is an error unless
        `overwrite`, which empties it)."""
        path = store_path(self.run_dir)
        try:
            self._store = UserStore(path, self.store_config())
        except RunStateError:
            if not overwrite:
                raise
            log.info("--overwrite: emptying the user store %s made with other settings", path)
            remove_store_files(path)
            self._store = UserStore(path, self.store_config())
        return self._store

    @property
    def store(self) -> UserStore:
        if self._store is None:
            path = store_path(self.run_dir)
            self._store = UserStore(path) if os.path.isfile(path) else self.open_store()
        return self._store

    def has_user(self, user_id: str) -> bool:
        return user_id in self.store

    @property
    def cached_users(self) -> int:
        """Users whose shifts are held on the device."""
        return len(self._cached)

    def personal_examples(self, user_id: str, items: list[dict]) -> list[Example]:
        """What a user's personal shift trains on: its latest max_history history items as prompts."""
        c = self.cfg
        items = items[-c.max_history:] if c.max_history > 0 else items
        return [self.builder.history_example(it, user_id) for it in items]

    def is_current(self, user_id: str, items: list[dict]) -> bool:
        """The user is stored and its shift was trained on exactly these items."""
        return user_id in self.store and \
            self.store.entry(user_id).get("history_digest") == history_digest(self.personal_examples(user_id, items))

    # ------------------------------------------------------------------ stage 2

    def personalize(self, histories: dict[str, list[dict]], desc: str = "stage 2",
                    jobs: dict[str, str] | None = None) -> dict[str, dict]:
        """Train the personal shifts of these users on their history items (the task's item format), user_group_size
        users at a time in one batched loop, each group stored (in one transaction) as soon as it is done; a retrained
        user keeps its old shift until the new one is stored. Returns {user_id: report} of the users stored. Under
        torchrun the groups are dealt to the ranks in turn and rank 0 stores them, in order. `jobs` ({user: job id}
        of the store's queue, what a server trains): a user is stored only if its job is still current (see
        `UserStore.put_many`), the job removed in the same commit."""
        self._require_collective()
        problems = []
        for uid, items in histories.items():
            if not isinstance(items, list) or not items:
                problems.append(f"user {uid!r}: no history items to personalize on")
            else:
                problems += validate_items(items, f"user {uid!r}", self.task)
        if problems:
            raise DataError(problems)
        todo, size = list(histories), self.cfg.user_group_size
        groups = [todo[g: g + size] for g in range(0, len(todo), size)]
        reports: dict[str, dict] = {}
        ranks, me = (dist.world(), dist.rank()) if dist.enabled() else (1, 0)
        for first in range(0, len(groups), ranks):
            k = first + me
            done = self._train_group(groups[k], histories, f"{desc} users {k * size + 1}-{k * size + len(groups[k])}/{len(todo)}") \
                if k < len(groups) else None
            for got in (dist.gather(_to_bytes(done)) or []) if ranks > 1 else [done]:
                got = _from_bytes(got) if ranks > 1 else got
                if got is None:
                    continue
                tensors_of, info = got
                stored = self.store.put_many(tensors_of, info, jobs)
                fault_point("stage2.group_stored")
                for u in info:
                    self._cached.pop(u, None)
                reports.update({u: info[u] for u in stored})
        return reports

    def _train_group(self, group: list[str], histories: dict[str, list[dict]], desc: str):
        """One group of users trained together: ({user: tensors}, {user: report})."""
        c = self.cfg
        module_of = {u: k for k, u in enumerate(group)}
        examples = {u: self.personal_examples(u, histories[u]) for u in group}
        # early stopping: a user's last items validate the rest (users with too few items train on all)
        n_val = {u: c.early_stopping if 0 < c.early_stopping < len(examples[u]) else 0 for u in group}
        ex = tokenize_examples(self.tok, [e for u in group for e in examples[u][: len(examples[u]) - n_val[u]]], c.max_length,
                               module_of)
        val = tokenize_examples(self.tok, [e for u in group for e in examples[u][len(examples[u]) - n_val[u]:]],
                                c.max_length, module_of)
        sh = self.collective.spawn(len(group))
        with sh.attached(self.model):
            stats = train_shifts(self.model, sh, ex, epochs=c.max_epoch, batch_size=c.batch_size, lr=c.user_lr,
                                 train_collective=False, pad_id=self.tok.pad_token_id, first=self.first, last=self.last,
                                 seed=c.seed, desc=desc, val_examples=val or None, patience=c.patience, **self._train_kw())
        now = round(time.time(), 3)
        info = {}
        for u in group:
            losses = stats.user_epoch_losses.get(module_of[u], [])
            info[u] = {"items": len(histories[u]), "examples": len(examples[u]), "history_digest": history_digest(examples[u]),
                       "epoch_losses": losses, "final_loss": losses[-1] if losses else None,
                       "train_seconds": round(stats.seconds / len(group), 3), "trained_at": now, "rank": dist.rank()}
            if module_of[u] in stats.user_best_epoch:
                info[u] |= {"best_epoch": stats.user_best_epoch[module_of[u]],
                            "val_losses": stats.user_val_losses[module_of[u]]}
        log.info("%s: trained %d users (loss by epoch %s, %.1fs)", desc, len(group), [round(x, 4) for x in stats.epoch_losses],
                 stats.seconds)
        return {u: sh.user_state(module_of[u]) for u in group}, info

    def forget(self, user_id: str) -> bool:
        """Remove everything stored about a user (its shift and its record); its next query gets the stage-1 shifts.
        Returns whether the user was stored."""
        self._cached.pop(user_id, None)
        return self.store.delete(user_id)

    # ------------------------------------------------------------------ generation

    def resolve_users(self, user_ids: list[str]) -> dict[str, tuple[str, dict[str, torch.Tensor]] | None]:
        """Each user's shift as stored now: (version, tensors on the device), or None (no stored shift: the stage-1
        shifts). One read of the store per call, whose result the caller carries through its whole batch, so that a
        user retrained or erased meanwhile (by this process or another) never mixes two states in one answer."""
        versions = self.store.versions(user_ids)
        out: dict[str, tuple[str, dict[str, torch.Tensor]] | None] = {}
        for u in dict.fromkeys(user_ids):
            v = versions.get(u)
            hit = self._cached.pop(u, None)
            if v is None:
                out[u] = None
                continue
            if hit is None or hit[0] != v:
                t = self.store.get_version(u, v)
                if t is None:  # replaced or erased since the versions were read: what is stored now, in one read
                    got = self.store.get_versioned(u)
                    if got is None:
                        out[u] = None
                        continue
                    t, v = got
                hit = (v, {k: x.to(self.device) for k, x in t.items()})
            self._cached[u] = hit
            out[u] = hit
        while len(self._cached) > self.max_cached_users:
            self._cached.popitem(last=False)
        return out

    def prompt_ids(self, inputs: list[str], raw: bool = False, max_new_tokens: int | None = None) -> list[list[int]]:
        """Token ids of the prompts: a task query gets the answer cue exactly as `perfit predict` applies it (a raw
        prompt is used as given); the start is cut when prompt + answer would exceed max_length."""
        limit = self.cfg.max_length - (max_new_tokens or self.task.max_new_tokens)
        return [tokenize_prompt(self.tok, t if raw else self.builder.query_prompt(t), limit) for t in inputs]

    def generate(self, user_ids: list[str], inputs: list[str], max_new_tokens: int | None = None, raw: bool = False,
                 variant: str = "perfit", desc: str = "generating") -> Generations:
        """Greedy answers, one per (user, input), many users in one batch. `variant`: perfit (the user's own shift on
        top of the collective one; users without a stored shift get the stage-1 shifts and are named in the result's
        `without_personal_shift`), stage1 (the stage-1 shifts for everyone) or zero_shot (no shift)."""
        if len(user_ids) != len(inputs):
            raise ValueError(f"{len(user_ids)} user ids for {len(inputs)} inputs")
        mnt = max_new_tokens or self.task.max_new_tokens
        out, used = self._decode(user_ids, self.prompt_ids(inputs, raw, mnt), variant, desc, max_new_tokens=mnt)
        return Generations(out.texts, [u for u, v in used.items() if v is None] if variant == "perfit" else [])

    def complete(self, requests: list["Completion"], desc: str = "serving") -> list["CompletionResult"]:
        """The server's entry: many users' prompts (token ids) in one batch, each with its own answer length and kind
        (a task answer, cleaned as `generate` does, or a raw completion that only EOS ends), tokens streamed through
        each request's `on_token` as they are generated."""
        streams = [r.on_token for r in requests]
        out, used = self._decode([r.user_id for r in requests], [r.prompt_ids for r in requests], "perfit", desc,
                                 max_new_tokens=[r.max_new_tokens for r in requests], task=[r.task for r in requests],
                                 on_token=(lambda i, t: streams[i](t) if streams[i] else None) if any(streams) else None)
        return [CompletionResult(out.texts[i], out.tokens[i], out.finish[i], used[r.user_id] is not None, used[r.user_id])
                for i, r in enumerate(requests)]

    def _decode(self, user_ids: list[str], prompts: list[list[int]], variant: str, desc: str, on_token=None, **kw):
        """Greedy decoding of `prompts`, user_group_size users per batched pass. Returns (GenerationOutput in input
        order, {user: the version of the stored shift that answered, None for the stage-1 shifts}); the store is read
        once for all of them."""
        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r}: choose from {', '.join(VARIANTS)}")
        kw = dict(batch_size=self.cfg.eval_batch_size, desc=desc, details=True) | kw
        none = dict.fromkeys(user_ids)
        if variant == "zero_shot":
            return greedy_generate(self.model, self.tok, prompts, on_token=on_token, **kw), none
        sh1 = self._require_collective()
        if variant == "stage1":
            with sh1.attached(self.model):
                return greedy_generate(self.model, self.tok, prompts, [0] * len(prompts), sh1, first=self.first,
                                       last=self.last, on_token=on_token, **kw), none
        out = GenerationOutput([""] * len(prompts), [[] for _ in prompts], [], ["length"] * len(prompts))
        users = list(dict.fromkeys(user_ids))
        shifts = self.resolve_users(users)
        unknown = [u for u in users if shifts[u] is None]
        per_row = {k: v for k, v in kw.items() if isinstance(v, list)}
        for g in range(0, len(users), self.cfg.user_group_size):
            group = users[g: g + self.cfg.user_group_size]
            known = [u for u in group if shifts[u] is not None]
            module_of = {u: 0 for u in group} | {u: k + 1 for k, u in enumerate(known)}  # module 0: P0
            sh = sh1.spawn(len(known) + 1)
            for u in known:
                sh.load_user_state(module_of[u], shifts[u][1])
            rows = [i for i, u in enumerate(user_ids) if u in module_of]
            row_kw = kw | {k: [v[i] for i in rows] for k, v in per_row.items()}
            with sh.attached(self.model):
                got = greedy_generate(self.model, self.tok, [prompts[i] for i in rows], [module_of[user_ids[i]] for i in rows],
                                      sh, first=self.first, last=self.last, **row_kw,
                                      on_token=None if on_token is None else (lambda j, t, rows=rows: on_token(rows[j], t)))
            for j, i in enumerate(rows):
                out.texts[i], out.tokens[i], out.finish[i] = got.texts[j], got.tokens[j], got.finish[j]
        if unknown:
            log.info("generate: %d users have no personal shift and got the stage-1 shifts: %s", len(unknown), unknown[:5])
        return out, {u: None if shifts[u] is None else shifts[u][0] for u in users}


@dataclass
class Completion:
    """One request to `PerFitModel.complete`."""
    user_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    task: bool = False  # True: a task answer (ends at its first line, cleaned); False: a raw completion (EOS ends it)
    on_token: Callable[[int], bool | None] | None = None  # each token as generated; True ends the answer there


@dataclass
class CompletionResult:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" or "length"
    personal_shift: bool
    shift_version: str | None = None  # the stored shift that answered (UserStore.version), None: the stage-1 shifts


def store_path(run_dir: str) -> str:
    """Where a run's user store is; a store in the earlier layout (a users/ folder) is an error that gives the one
    command converting it."""
    path, legacy = os.path.join(run_dir, USERS), os.path.join(run_dir, LEGACY_USERS)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(legacy, "index.json")):
        raise RunStateError(legacy_store_message(legacy, run_dir))
    return path


def run_store(run_dir: str) -> UserStore:
    """A run's user store on its own (no model), or a clear error (no run dir; a store in the earlier layout)."""
    load_run_config(run_dir)
    return UserStore(store_path(run_dir))


def forget_user(run_dir: str, user_id: str) -> bool:
    """`PerFitModel.forget` without loading a model (what `perfit forget` runs)."""
    return run_store(run_dir).delete(user_id)


def _config_diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) & set(b) if a.get(k) != b.get(k) and k not in ("output_dir", "run_dir_name"))
    return ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:5]) or "same settings, other data"
