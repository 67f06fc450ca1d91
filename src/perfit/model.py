"""`PerFitModel`: a frozen backbone, the collective shift (stage 1) and the store of personal shifts (stage 2) of one
run. The one core that every command, the server and the benchmarks use, in the manner of peft's `PeftModel`:

    pm = PerFitModel.from_run("output/movie_tagging/<run_dir>")       # no data files, no command line
    pm.generate(["u0001", "new-user"], ["description: ... tag:", "..."])  # many users in one batch
    pm.personalize({"new-user": [history items]})                     # batched stage 2, stored atomically
    pm.forget("new-user")

It holds the run's state and decides what happens; each job lives with its subject: the run dir on disk in
`rundir`, training in `train.stages`, what ranks exchange in `train.exchange`, the device cache of users' shifts in
`method.bank`, decoding in `generate`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time

import torch

from . import dist
from .backbone import Backbone, check_layers, load_backbone
from .batching import tokenize_examples, tokenize_prompt
from .config import PERSONALIZE_MODES, RunConfig, artifact_keys, fields_affecting, check_run_overrides, parse_positions, run_fields
from .data import DataError, latest, validate_items, write_json_atomic
from .errors import RunStateError
from .faults import fault_point
from .generate import Completion, CompletionResult, GenerationOutput, Generations, greedy_generate
from .prompts import Example, PromptBuilder
from .method.generator import ShiftGenerator, item_features, user_tensors
from .rundir import (CKPT, CONFIG_FILE, GENERATOR, PARTIAL, PROMPTS_FILE, config_diff, has_checkpoint, load_collective,
                     load_partial, load_run_config, read_generator, resolve_for_model, save_partial, store_path,
                     write_checkpoint, write_generator)
from .method.bank import COLLECTIVE, ShiftBank
from .method.config import PerFitConfig
from .method.io import PerFitShifts, on_prefill
from .method.shifts import Shifter
from .store import UserStore, history_digest
from .store import remove_files as remove_store_files
from .tasks import get_task
from .train import TrainStats
from .train import stages
from .train.exchange import deal_out, pack, unpack

log = logging.getLogger("perfit")
VARIANTS = ("zero_shot", "stage1", "perfit")
__all__ = ["Completion", "CompletionResult", "Generations", "PerFitModel", "VARIANTS"]


class NoStore:
    """What a run without a user store reads as: no users, no versions (nothing is created by reading)."""
    def __init__(self, path: str):
        self.path = path

    def __len__(self) -> int:
        return 0

    def __contains__(self, user_id) -> bool:
        return False

    def users(self) -> list[str]:
        return []

    def entries(self) -> dict:
        return {}

    def versions(self, user_ids) -> dict:
        return {}

    def version(self, user_id):
        return None

    def get_version(self, user_id, version):
        return None

    def get_versioned(self, user_id):
        return None

    def delete(self, user_id) -> bool:
        return False

    def __getattr__(self, name):  # a write or a job operation: there is no store to do it in
        raise RunStateError(f"{self.path}: the run has no user store yet; PerFitModel.writable_store() makes one")


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
        self.max_cached_users = max_cached_users
        self.bank: ShiftBank | None = None  # the collective shift, P0 and users' shifts as factors on the device
        self.generator: ShiftGenerator | None = None  # the instant path (None: the run has none)
        self.generator_meta: dict = {}

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
        if os.path.isfile(os.path.join(run_dir, GENERATOR)):
            pm.set_generator(*read_generator(os.path.join(run_dir, GENERATOR)))
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
        self.bank = ShiftBank(self.collective, self.device, self.max_cached_users)

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
                                f"({config_diff(meta.get('run_config', {}), run_fields(self.cfg))}); "
                                f"use another --run_dir_name, or --overwrite 1 to retrain it and its users")
        return False

    def adopt_collective(self, ckpt_dir: str) -> bool:
        """Reuse another run's stage-1 checkpoint (copied in) when it has this run's stage-1 key."""
        sh, meta = load_collective(ckpt_dir)
        if meta.get("stage1_key") != self.keys()["stage1"]:
            return False
        write_checkpoint(self.run_dir, sh, meta)
        self.set_collective(sh, meta)
        return True

    def fit_collective(self, examples: list[Example], desc: str = "stage 1", fresh: bool = False) -> TrainStats:
        """Stage 1: the collective shift and the initial personal shift P0 on all `examples` (other users' data),
        saved to the run's checkpoint (atomically: a crash never leaves one that half-loads). The training state is
        saved at the end of every epoch; a run killed on the way resumes from it (unless `fresh`) to the same result."""
        key = self.keys()["stage1"]
        partial = os.path.join(self.run_dir, PARTIAL)
        resume = None if fresh or not dist.is_main() else load_partial(partial, key)
        if dist.enabled():  # rank 0 reads the run dir; every rank resumes alike
            resume = unpack(dist.broadcast(pack(resume)))
        if resume is not None:
            log.info("%s: resuming at step %d from %s", desc, resume.step, partial)

        def on_epoch(state) -> None:
            if dist.is_main():
                save_partial(partial, key, state)

        sh, stats, learning = stages.fit_collective(self.model, self.tok, self.cfg, self.info.hidden_size, self.first,
                                                    self.last, examples, desc, resume, on_epoch, self._train_kw())
        meta = stages.stage1_meta(self.cfg, run_fields(self.cfg), key, self.fingerprints, self.info, stats, learning,
                                  len(examples))
        if dist.is_main():
            write_checkpoint(self.run_dir, sh, meta)
            if os.path.exists(partial):
                os.unlink(partial)  # after the checkpoint: a crash in between leaves a complete one, the state unused
        self.set_collective(sh, meta)
        return stats

    # ------------------------------------------------------------------ the shift generator

    def set_generator(self, gen: ShiftGenerator, meta: dict) -> None:
        self.generator = gen.to(self.device)
        self.generator_meta = meta

    def load_generator_if_current(self) -> bool:
        """Load this run's shift generator if it was made with the current stage 1 and generator settings."""
        path = os.path.join(self.run_dir, GENERATOR)
        if not os.path.isfile(path):
            return False
        gen, meta = read_generator(path)
        if meta.get("generator_key") != self.keys()["generator"]:
            return False
        self.set_generator(gen, meta)
        return True

    def adopt_generator(self, path: str) -> bool:
        """Reuse another run's shift generator (copied in) when it has this run's generator key."""
        if not os.path.isfile(path):
            return False
        gen, meta = read_generator(path)
        if meta.get("generator_key") != self.keys()["generator"]:
            return False
        write_generator(os.path.join(self.run_dir, GENERATOR), gen, meta)
        self.set_generator(gen, meta)
        return True

    def fit_generator(self, per_user: dict[str, list[Example]], desc: str = "shift generator") -> dict:
        """Learn the shift generator from these stage-1 users' examples (episodically: some of a user's items in, the
        others' loss out), saved beside the collective shift with the config that made it. Returns its report."""
        from .train.generator import fit_generator

        collective = self._require_collective()
        gen, report = fit_generator(self.model, self.tok, self.cfg, collective, self.first, self.last, per_user, desc,
                                    self.cfg.cache_max_bytes)
        meta = {"generator_key": self.keys()["generator"], "stage1_key": self.keys()["stage1"],
                "run_config": run_fields(self.cfg), "report": report}
        if dist.is_main():
            write_generator(os.path.join(self.run_dir, GENERATOR), gen, meta)
        self.set_generator(gen, meta)
        return report

    def _require_generator(self) -> ShiftGenerator:
        if self.generator is None:
            raise RunStateError(f"{self.run_dir}: no shift generator; make one with `perfit run --personalize instant` "
                                f"(or --generator 1) on this run's settings")
        return self.generator

    @torch.no_grad()
    def history_features(self, examples: list[Example]) -> torch.Tensor:
        """What the shift generator reads of each history example [N, F]: one no-grad pass of the frozen model (stopped
        after the highest shifted layer). A user's profile is the mean of its rows, so the rows can come in parts."""
        return item_features(self.model, tokenize_examples(self.tok, examples, self.cfg.max_length), self.cfg.layers,
                             self.tok.pad_token_id)[0]

    @torch.no_grad()
    def shifts_from_profiles(self, profiles: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """{user: mean feature row} -> {user: generated shift tensors} in one pass of the generator."""
        gen = self._require_generator()
        users = list(profiles)
        delta = gen(torch.stack([profiles[u] for u in users]).to(self.device))
        p0 = {n: t.to(self.device) for n, t in self._require_collective().user_state(0).items()}
        return {u: user_tensors(p0, delta, i) for i, u in enumerate(users)}

    def instant_shifts(self, examples: dict[str, list[Example]]) -> dict[str, dict[str, torch.Tensor]]:
        """Each user's generated personal shift (the tensors stage 2 would train) from its history examples: one
        no-grad pass of the frozen model over them and one pass of the generator."""
        self._require_generator()
        users = list(examples)
        feats = self.history_features([e for u in users for e in examples[u]])
        profiles, k = {}, 0
        for u in users:
            profiles[u] = feats[k: k + len(examples[u])].mean(0)
            k += len(examples[u])
        return self.shifts_from_profiles(profiles)

    def store_generated(self, tensors_of: dict[str, dict[str, torch.Tensor]], examples: dict[str, list[Example]],
                        seconds: float, jobs: dict[str, str] | None = None, keep_jobs: bool = False,
                        items: dict[str, int] | None = None) -> dict[str, dict]:
        """Store generated shifts (one transaction) with their records (`items`: each user's history items, default
        its examples); `jobs`/`keep_jobs` as UserStore.put_many. Returns {user: record} of those stored."""
        now = round(time.time(), 3)
        info = {u: {"items": (items or {}).get(u, len(examples[u])), "examples": len(examples[u]), "history_digest": history_digest(examples[u]),
                    "mode": "instant", "epoch_losses": [], "final_loss": None, "train_seconds": round(seconds, 4),
                    "trained_at": now, "rank": dist.rank()} for u in tensors_of}
        stored = self.writable_store().put_many(tensors_of, info, jobs, keep_jobs)
        self._drop_cached(tensors_of)
        return {u: info[u] for u in stored}

    def measure_cost(self, examples: list[Example], inputs: list[str]):
        """What this run's work costs on this device (`train.cost.Rates`): `examples` (a few of the run's own) trained
        for two epochs at the run's settings on a throwaway shift, and one generation batch of the task queries
        `inputs`. Nothing is saved."""
        from .train.cost import measure

        return measure(self.model, self.tok, self.cfg, self.info.hidden_size, self.first, self.last, examples,
                       self.prompt_ids(inputs), self.task.max_new_tokens, self._train_kw())

    def _train_kw(self) -> dict:
        c = self.cfg
        return dict(max_rows=c.rows_per_pass, cache_max_bytes=c.cache_max_bytes, disk_cache_max_bytes=c.disk_cache_max_bytes,
                    disk_cache_dir=c.disk_cache_dir or os.path.join(self.run_dir, "cache"))

    # ------------------------------------------------------------------ the user store

    def store_config(self) -> dict:
        """What the store records of the settings its shifts were made with: every field declared to affect them."""
        return {"key": self.keys()["users"], "stage1_key": self.keys()["stage1"],
                "settings": {k: getattr(self.cfg, k) for k in fields_affecting("users")}}

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
        """The run's user store, opened on first use. A read never makes one: a run without a store reads as one with
        no users (`writable_store` makes it, as every write does)."""
        if self._store is None:
            path = store_path(self.run_dir)
            if not os.path.isfile(path):
                return NoStore(path)
            self._store = UserStore(path)
        return self._store

    def writable_store(self) -> UserStore:
        """The run's user store to write to: the existing one (as `store` reads it), or a new one made with the run's
        settings."""
        store = self.store
        return self.open_store() if isinstance(store, NoStore) else store

    def has_user(self, user_id: str) -> bool:
        return user_id in self.store

    @property
    def cached_users(self) -> int:
        """Users whose shifts are held on the device."""
        return len(self.bank) if self.bank is not None else 0

    def personal_examples(self, user_id: str, items: list[dict]) -> list[Example]:
        """What a user's personal shift trains on: its latest max_history history items as prompts."""
        return [self.builder.history_example(it, user_id) for it in latest(items, self.cfg.max_history)]

    def is_current(self, user_id: str, items: list[dict]) -> bool:
        """The user is stored and its shift was trained on exactly these items."""
        return user_id in self.store and \
            self.store.entry(user_id).get("history_digest") == history_digest(self.personal_examples(user_id, items))

    # ------------------------------------------------------------------ stage 2

    def personalize(self, histories: dict[str, list[dict]], desc: str = "stage 2",
                    jobs: dict[str, str] | None = None, mode: str | None = None, keep_jobs: bool = False) -> dict[str, dict]:
        """`mode` (default: the run's --personalize): train, instant or instant+train. instant: each user's shift from
        the shift generator in one pass, no training, stored at once; instant+train: stage 2 started from the
        generated shift, for warm_epochs; train: as follows. Train the personal shifts of these users on their history items (the task's item format), user_group_size
        users at a time in one batched loop, each group stored (in one transaction) as soon as it is done; a retrained
        user keeps its old shift until the new one is stored. Returns {user_id: report} of the users stored. Under
        torchrun the groups are dealt to the ranks in turn and rank 0 stores them, in order. `jobs` ({user: job id}
        of the store's queue, what a server trains): a user is stored only if its job is still current (see
        `UserStore.put_many`), the job removed in the same commit."""
        collective = self._require_collective()
        problems = []
        for uid, items in histories.items():
            if not isinstance(items, list) or not items:
                problems.append(f"user {uid!r}: no history items to personalize on")
            else:
                problems += validate_items(items, f"user {uid!r}", self.task)
        if problems:
            raise DataError(problems)
        mode = mode or self.cfg.personalize
        if mode not in PERSONALIZE_MODES:
            raise ValueError(f"personalize mode {mode!r}: choose from {', '.join(PERSONALIZE_MODES)}")
        if mode != "train":
            self._require_generator()
        if mode == "instant":
            return self._personalize_instant(histories, jobs, keep_jobs)
        todo, size = list(histories), self.cfg.user_group_size
        groups = [todo[g: g + size] for g in range(0, len(todo), size)]
        reports: dict[str, dict] = {}

        def train(k: int, group: list[str]):
            exs = {u: self.personal_examples(u, histories[u]) for u in group}
            start, t0 = None, time.perf_counter()
            if mode == "instant+train":
                start = self.instant_shifts(exs)
            cfg = self.cfg if start is None else dataclasses.replace(self.cfg, max_epoch=self.cfg.warm_epochs)
            done = stages.train_group(self.model, self.tok, cfg, collective, self.first, self.last, exs,
                                      {u: len(histories[u]) for u in group},
                                      f"{desc} users {k * size + 1}-{k * size + len(group)}/{len(todo)}",
                                      self._train_kw(), start=start)
            for u in group:
                done[1][u] |= {"mode": mode}
                if start is not None:  # the generator's pass counts in the user's cost
                    done[1][u]["train_seconds"] = round((time.perf_counter() - t0) / len(group), 3)
            return done

        def store(got) -> None:
            tensors_of, info = got
            stored = self.writable_store().put_many(tensors_of, info, jobs)
            fault_point("stage2.group_stored")
            self._drop_cached(info)
            reports.update({u: info[u] for u in stored})

        deal_out(groups, train, store)  # under torchrun: groups dealt to the ranks, rank 0 stores them in order
        return reports

    def _personalize_instant(self, histories: dict[str, list[dict]], jobs: dict[str, str] | None,
                             keep_jobs: bool = False) -> dict[str, dict]:
        """Generated shifts, user_group_size users per pass, each group stored in one transaction."""
        reports: dict[str, dict] = {}
        todo, size = list(histories), self.cfg.user_group_size
        for g in range(0, len(todo), size):
            group = todo[g: g + size]
            t0 = time.perf_counter()
            exs = {u: self.personal_examples(u, histories[u]) for u in group}
            tensors_of = self.instant_shifts(exs)
            reports |= self.store_generated(tensors_of, exs, (time.perf_counter() - t0) / len(group), jobs, keep_jobs,
                                            {u: len(histories[u]) for u in group})
        return reports

    # ------------------------------------------------------------------ the method's own format

    def perfit_config(self) -> PerFitConfig:
        return PerFitConfig.from_run(self.cfg, self.info.hidden_size)

    def save_pretrained(self, folder: str, users: list[str] | None = None) -> list[str]:
        """The collective shift, P0, the shift generator (if the run has one) and these users' stored shifts (None:
        every stored user) in a folder of their own
        (`perfit.method.io`: perfit_config.json + safetensors), loadable with `PerFitShifts.from_pretrained` in any
        process that has the base model. Returns the users saved; one not stored is an error."""
        collective = self._require_collective()
        ids = self.store.users() if users is None else list(users)
        missing = [u for u in ids if u not in self.store]
        if missing:
            raise RunStateError(f"{self.run_dir}: user(s) {missing[:5]} have no stored shift to save")
        shifts = PerFitShifts(self.perfit_config(), collective, {u: self.store.get(u) for u in ids},
                              {u: self.store.entry(u) for u in ids}, self.generator, self.generator_meta)
        shifts.save_pretrained(folder)
        return ids

    @contextlib.contextmanager
    def shifted(self, user_ids: list[str | None]):
        """Within the block, the backbone's own forward and `generate` (`pm.model`) run with row i's shifts: the
        collective shift plus user_ids[i]'s stored shift (None or a user without one: P0), on the prompt positions of
        the prefill only, as `generate` does. Prompts left-padded (`pm.tok.padding_side = "left"`); the store is read
        once for the block."""
        bank = self._require_bank()
        shifts = self.resolve_users([u for u in user_ids if u is not None])
        with self._pinned(bank, shifts) as slots:
            rows = torch.tensor([slots.get(u, COLLECTIVE) for u in user_ids], device=self.device)
            with on_prefill(self.model, bank, rows, self.first, self.last):
                yield self.model

    def forget(self, user_id: str) -> bool:
        """Remove everything stored about a user (its shift, its record, its queued history); its next query gets the
        stage-1 shifts. Returns whether anything was stored."""
        self._drop_cached([user_id])
        return self.store.delete(user_id)

    def _drop_cached(self, users) -> None:
        if self.bank is not None:
            for u in users:
                self.bank.drop(u)

    # ------------------------------------------------------------------ generation

    def resolve_users(self, user_ids: list[str]) -> dict[str, tuple[str, dict[str, torch.Tensor] | None] | None]:
        """Each user's shift as stored now: (version, its tensors, or None when the bank already holds that version),
        or None (the stage-1 shifts); one read of the versions, carried through the caller's whole batch."""
        bank = self._require_bank()
        versions = self.store.versions(user_ids)
        out: dict[str, tuple[str, dict[str, torch.Tensor] | None] | None] = {}
        for u in dict.fromkeys(user_ids):
            v = versions.get(u)
            if v is None or bank.holds(u, v):
                out[u] = None if v is None else (v, None)
                continue
            t = self.store.get_version(u, v)
            if t is None:  # replaced or erased since the versions were read: what is stored now, in one read
                got = self.store.get_versioned(u)
                out[u] = None if got is None else (got[1], got[0])
            else:
                out[u] = (v, t)
        return out

    @contextlib.contextmanager
    def _pinned(self, bank: ShiftBank, shifts: dict[str, tuple[str, dict[str, torch.Tensor] | None] | None]):
        """{user: its bank slot} for these resolved users (`resolve_users`), pinned for the block."""
        slots = {}
        try:
            for user, shift in shifts.items():
                if shift is None:
                    slots[user] = COLLECTIVE
                    continue
                version, tensors = shift
                # a version held at resolve time may have been evicted by an earlier group since: read it again then
                slots[user] = bank.acquire(user, version, lambda: tensors if tensors is not None
                                           else self.store.get_version(user, version))
            yield slots
        finally:
            for slot in slots.values():
                bank.release(slot)

    def _require_bank(self) -> ShiftBank:
        self._require_collective()
        return self.bank

    def prompt_ids(self, inputs: list[str], raw: bool = False, max_new_tokens: int | None = None) -> list[list[int]]:
        """Token ids of the prompts: a task query gets the answer cue exactly as `perfit predict` applies it (a raw
        prompt is used as given); the start is cut when prompt + answer would exceed max_length."""
        n_new = max_new_tokens or self.task.max_new_tokens
        limit = self.cfg.max_length - n_new
        if limit < 1:
            raise ValueError(f"max_new_tokens {n_new} leaves no room for the prompt within the run's max_length "
                             f"{self.cfg.max_length}")
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

    def complete(self, requests: list[Completion], desc: str = "serving") -> list[CompletionResult]:
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
        bank = self._require_bank()
        if variant == "stage1":
            with bank.attached(self.model):
                return greedy_generate(self.model, self.tok, prompts, [0] * len(prompts), bank, first=self.first,
                                       last=self.last, on_token=on_token, **kw), none
        out = GenerationOutput([""] * len(prompts), [[] for _ in prompts], [], ["length"] * len(prompts))
        users = list(dict.fromkeys(user_ids))
        shifts = self.resolve_users(users)
        unknown = [u for u in users if shifts[u] is None]
        per_row = {k: v for k, v in kw.items() if isinstance(v, list)}
        for g in range(0, len(users), self.cfg.user_group_size):
            group = users[g: g + self.cfg.user_group_size]
            with self._pinned(bank, {u: shifts[u] for u in group}) as slot_of:
                rows = [i for i, u in enumerate(user_ids) if u in slot_of]
                row_kw = kw | {k: [v[i] for i in rows] for k, v in per_row.items()}
                with bank.attached(self.model):
                    got = greedy_generate(self.model, self.tok, [prompts[i] for i in rows], [slot_of[user_ids[i]] for i in rows],
                                          bank, first=self.first, last=self.last, **row_kw,
                                          on_token=None if on_token is None else (lambda j, t, rows=rows: on_token(rows[j], t)))
            for j, i in enumerate(rows):
                out.texts[i], out.tokens[i], out.finish[i] = got.texts[j], got.tokens[j], got.finish[j]
        if unknown:
            log.info("generate: %d users have no personal shift and got the stage-1 shifts: %s", len(unknown), unknown[:5])
        return out, {u: None if shifts[u] is None else shifts[u][0] for u in users}
