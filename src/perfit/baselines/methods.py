"""The methods `perfit compare` runs side by side, each trained (when needed) and evaluated on the same model, users
and queries, found through one registry (REGISTRY). PerFit's run through `PerFitModel`; the peers' trained parts
(task LoRA, OPPU's per-user LoRAs, the stage-2-only shifts) are stored under `<output_dir>/<task>/baselines/`, keyed
by the settings they depend on."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import time

import torch

from .. import metrics, pipeline
from ..backbone import load_backbone
from ..config import METHODS, CompareConfig, artifact_keys, to_dict
from ..data import write_json_atomic
from ..generate import greedy_generate
from ..model import PerFitModel

log = logging.getLogger("perfit")


def peak_mib(device: torch.device | None = None) -> float:
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _record(exp, method: str, preds: list[str], device=None, **cost) -> dict:
    qids, _, _ = exp.queries
    rec = {"method": method, "what": REGISTRY[method][0], "metrics": metrics.evaluate(exp.data.task, exp.golds, dict(zip(qids, preds))),
           "users": len(exp.data.test_users), "queries": len(qids), "params_shared": 0, "params_per_user": 0,
           "bytes_per_user": 0, "train_seconds_shared": 0.0, "train_seconds_per_user": 0.0, "generate_seconds_per_query": 0.0}
    rec.update(cost)
    rec["peak_memory_mib"] = round(peak_mib(device), 1)
    rec["device"] = str(device) if device is not None else "cpu (no model)"
    rec["predictions"] = dict(zip(qids, preds))
    for k in ("train_seconds_shared", "train_seconds_per_user", "generate_seconds_per_query"):
        rec[k] = round(rec[k], 4)
    return rec


def _baseline_dir(exp, artifact: str) -> str:
    key = artifact_keys(exp.cfg, exp.fingerprints)[artifact]
    return os.path.join(exp.cfg.output_dir, exp.cfg.task_name, "baselines", f"{artifact}-{key}")


def _shift_settings(c) -> dict:
    return {"lr": c.lr, "user_lr": c.user_lr, "stage1_epochs": c.stage1_epochs, "max_epoch": c.max_epoch,
            "low_rank_dimension": c.low_rank_dimension, "user_low_rank_dimension": c.user_low_rank_dimension,
            "layers": c.intervene_layer, "positions": c.positions, "shift_init": c.shift_init, "query_cue": c.query_cue}


def _timed_generate(pm: PerFitModel, exp, inputs=None, **kw) -> tuple[list[str], float]:
    qids, owners, qinputs = exp.queries
    t0 = time.perf_counter()
    preds = pm.generate(owners, inputs or qinputs, **kw)
    return list(preds), (time.perf_counter() - t0) / len(qids)


# ---------------------------------------------------------------- the methods

def _user_majority(exp, cfg) -> dict:
    from . import retrieval

    t0 = time.perf_counter()
    preds = []
    task = exp.data.task
    for u in exp.data.test_users:
        items = pipeline.history_items(exp.cfg, u)
        index = None if task.has_labels else retrieval.UserIndex(task, items)
        preds += [retrieval.majority_answer(task, items, q.input, index, exp.builder.options(q.input)) for q in u.query]
    return _record(exp, "user_majority", preds, generate_seconds_per_query=(time.perf_counter() - t0) / len(preds))


def _global_majority(exp, cfg) -> dict:
    """One answer for everyone: the label most frequent among the stage-1 examples (LaMP-3's "always the most
    frequent score"); ties go to the label listed first. Only tasks with a label set have one."""
    from collections import Counter

    task = exp.data.task
    t0 = time.perf_counter()
    counts = Counter(e.target.strip() for e in pipeline.scan_training_data(exp, collect=True))
    best = max(task.labels, key=lambda lab: (counts[lab], -task.labels.index(lab)))
    preds = [best] * len(exp.queries[0])
    return _record(exp, "global_majority", preds, generate_seconds_per_query=(time.perf_counter() - t0) / len(preds),
                   settings={"answer": best, "counts": {lab: counts[lab] for lab in task.labels}})


def _zero_shot(exp, cfg) -> dict:
    pm = pipeline.open_model(exp)
    preds, gen_s = _timed_generate(pm, exp, variant="zero_shot", desc="zero_shot")
    return _record(exp, "zero_shot", preds, pm.device, generate_seconds_per_query=gen_s)


def _rag(exp, cfg) -> dict:
    from . import retrieval

    pm = pipeline.open_model(exp)
    task = exp.data.task
    prompts = []
    for u in exp.data.test_users:
        index = retrieval.UserIndex(task, pipeline.history_items(exp.cfg, u))
        prompts += [retrieval.rag_prompt(pm.builder.tpl, pm.builder.query_prompt(q.input), index.top(q.input, cfg.rag_k), cfg.rag_item_words)
                    for q in u.query]
    preds, gen_s = _timed_generate(pm, exp, prompts, raw=True, variant="zero_shot", desc="rag")
    return _record(exp, "rag", preds, pm.device, generate_seconds_per_query=gen_s,
                   settings={"rag_k": cfg.rag_k, "rag_item_words": cfg.rag_item_words})


def _stage1(exp, cfg) -> dict:
    pm = pipeline.open_model(exp)
    pipeline.ensure_stage1(exp, pm)
    preds, gen_s = _timed_generate(pm, exp, variant="stage1", desc="stage1")
    sh = pm.collective
    return _record(exp, "stage1", preds, pm.device, params_shared=sh.collective_parameters() + sh.personal_parameters(),
                   train_seconds_shared=exp.timings["stage1_train_seconds"], generate_seconds_per_query=gen_s,
                   settings=_shift_settings(exp.cfg))


def _personal_cost(exp, pm: PerFitModel) -> dict:
    n = len(exp.data.test_users)
    return {"params_per_user": pm.collective.personal_parameters(), "bytes_per_user": pm.store.bytes_per_user(),
            "train_seconds_per_user": sum(pm.store.entry(u.user_id)["train_seconds"] for u in exp.data.test_users) / n}


def _perfit(exp, cfg) -> dict:
    pm = pipeline.open_model(exp)
    pipeline.ensure_stage1(exp, pm)
    pipeline.ensure_users(exp, pm)
    preds, gen_s = _timed_generate(pm, exp, variant="perfit", desc="perfit")
    sh = pm.collective
    return _record(exp, "perfit", preds, pm.device, params_shared=sh.collective_parameters() + sh.personal_parameters(),
                   train_seconds_shared=exp.timings["stage1_train_seconds"], generate_seconds_per_query=gen_s,
                   settings=_shift_settings(exp.cfg), **_personal_cost(exp, pm))


def _stage2_only(exp, cfg) -> dict:
    """The paper's ablation: a personal shift of rank LRank+ULRank per user, from one random start, no stage 1. It is
    PerFit with no collective shift and a stage 1 of zero epochs (which only initialises P0)."""
    c = exp.cfg
    rank = c.low_rank_dimension + c.user_low_rank_dimension
    sub = dataclasses.replace(exp, cfg=dataclasses.replace(c, low_rank_dimension=0, user_low_rank_dimension=rank, stage1_epochs=0),
                              run_dir=_baseline_dir(exp, "stage2_only"), timings={})
    pm = pipeline.open_model(sub)
    pipeline.ensure_stage1(sub, pm)
    pipeline.ensure_users(sub, pm, label="stage-2-only")
    preds, gen_s = _timed_generate(pm, sub, variant="perfit", desc="stage-2-only")
    return _record(exp, "perfit_stage2_only", preds, pm.device, generate_seconds_per_query=gen_s, **_personal_cost(sub, pm),
                   settings={"user_lr": c.user_lr, "max_epoch": c.max_epoch, "rank": rank, "layers": c.intervene_layer,
                             "positions": c.positions, "shift_init": c.shift_init})


def _task_lora_model(exp, cfg, backbone):
    """The task LoRA trained on every stage-1 example, or loaded when already trained with the same key.
    Returns (peft model, seconds it took to train)."""
    from safetensors.torch import load_file

    from . import lora
    from ..batching import tokenize_examples
    from ..store import save_safetensors_atomic

    model, tok, _ = backbone
    pm = lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    folder = _baseline_dir(exp, "task_lora")
    meta_path = os.path.join(folder, "config.json")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        lora.load_adapter(pm, load_file(os.path.join(folder, "adapter.safetensors")))
        return pm, meta["train_seconds"]
    ex = tokenize_examples(tok, pipeline.scan_training_data(exp, collect=True), cfg.max_length)
    stats = lora.train_lm(model, ex, epochs=cfg.stage1_epochs, batch_size=cfg.batch_size, lr=cfg.lora_lr,
                          pad_id=tok.pad_token_id, seed=cfg.seed, key="task", desc="task LoRA")
    log.info("task LoRA: %d examples, loss %.3f -> %.3f, %.1fs", len(ex), stats["first_loss"], stats["last_loss"], stats["seconds"])
    save_safetensors_atomic(os.path.join(folder, "adapter.safetensors"), lora.adapter_state(pm), {})
    peft_cfg = pm.peft_config["default"].to_dict() | {"target_modules": sorted(pm.peft_config["default"].target_modules)}
    write_json_atomic(meta_path, {"train_seconds": stats["seconds"], "stats": stats, "peft_config": peft_cfg, "run_config": to_dict(cfg)})
    return pm, stats["seconds"]


def _lora_method(exp, cfg, method: str) -> dict:
    from . import lora
    from ..batching import tokenize_examples
    from ..store import UserStore, history_digest

    c = exp.cfg
    backbone = load_backbone(c.model_path, c.dtype, c.cuda_device, c.model_name)
    model, tok, _ = backbone
    device = next(model.parameters()).device
    pmodel = PerFitModel(c, backbone, exp.run_dir)  # for the prompts only: LoRA methods use no shift
    qids, owners, inputs = exp.queries
    prompts = pmodel.prompt_ids(inputs)
    gen = dict(max_new_tokens=exp.data.task.max_new_tokens, batch_size=c.eval_batch_size)
    peft_model, shared_s = _task_lora_model(exp, cfg, backbone)
    shared_params = lora.lora_parameters(peft_model)
    settings = {"lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha, "lora_targets": cfg.lora_targets,
                "lora_lr": cfg.lora_lr, "epochs": c.stage1_epochs}
    if method == "task_lora":
        t0 = time.perf_counter()
        preds = greedy_generate(peft_model, tok, prompts, desc="task LoRA", **gen)
        return _record(exp, method, preds, device, params_shared=shared_params, train_seconds_shared=shared_s,
                       generate_seconds_per_query=(time.perf_counter() - t0) / len(qids), settings=settings)
    # OPPU: the task LoRA becomes part of the base, then each user gets a fresh LoRA of its own
    pipeline.scan_training_data(exp, collect=False)
    base = peft_model.merge_and_unload()
    upm = lora.add_lora(base, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed + 1)
    init = lora.adapter_state(upm)
    keys = artifact_keys(cfg, exp.fingerprints)
    store = UserStore(os.path.join(_baseline_dir(exp, "oppu"), "users.sqlite"),
                      {"key": keys["oppu"], "settings": settings | {"oppu_lr": cfg.oppu_lr}})
    preds = [""] * len(prompts)
    gen_s = 0.0
    for u in exp.data.test_users:
        examples = pmodel.personal_examples(u.user_id, u.profile)
        digest = history_digest(examples)
        if u.user_id in store and store.entry(u.user_id).get("history_digest") == digest:
            lora.load_adapter(upm, store.get(u.user_id))
        else:
            lora.load_adapter(upm, init)
            ex = tokenize_examples(tok, examples, c.max_length)
            stats = lora.train_lm(base, ex, epochs=cfg.oppu_epochs, batch_size=c.batch_size, lr=cfg.oppu_lr,
                                  pad_id=tok.pad_token_id, seed=c.seed, key=u.user_id, desc=f"OPPU {u.user_id}")
            store.put_many({u.user_id: lora.adapter_state(upm)},
                           {u.user_id: {"examples": len(ex), "history_digest": digest, "train_seconds": round(stats["seconds"], 3)}})
        rows = [i for i, o in enumerate(owners) if o == u.user_id]
        t0 = time.perf_counter()
        got = greedy_generate(base, tok, [prompts[i] for i in rows], desc=f"OPPU {u.user_id}", **gen)
        gen_s += time.perf_counter() - t0
        for i, p in zip(rows, got):
            preds[i] = p
    n = len(exp.data.test_users)
    return _record(exp, method, preds, device, params_shared=shared_params, params_per_user=lora.lora_parameters(upm),
                   bytes_per_user=store.bytes_per_user(), train_seconds_shared=shared_s,
                   train_seconds_per_user=sum(store.entry(u.user_id)["train_seconds"] for u in exp.data.test_users) / n,
                   generate_seconds_per_query=gen_s / len(qids), settings=settings | {"oppu_lr": cfg.oppu_lr, "user_epochs": cfg.oppu_epochs})


# one entry per method: what it is, and how it runs
def _perfit_mode(exp, method: str, mode: str) -> dict:
    """PerFit with another way to personalize (its own run dir; stage 1 and the generator reused from a sibling)."""
    exp = pipeline.prepare(dataclasses.replace(exp.cfg, personalize=mode, generator=1))
    pm = pipeline.open_model(exp)
    pipeline.ensure_stage1(exp, pm)
    pipeline.ensure_generator(exp, pm)
    pipeline.ensure_users(exp, pm)
    preds, gen_s = _timed_generate(pm, exp, variant="perfit", desc=method)
    sh = pm.collective
    shared = exp.timings["stage1_train_seconds"] + exp.timings.get("generator_train_seconds", 0.0)
    return _record(exp, method, preds, pm.device, params_shared=sh.collective_parameters() + sh.personal_parameters()
                   + pm.generator.num_parameters(), train_seconds_shared=shared, generate_seconds_per_query=gen_s,
                   settings=_shift_settings(exp.cfg) | {"personalize": mode, "warm_epochs": exp.cfg.warm_epochs,
                                                        "generator": pm.generator_meta.get("report", {})},
                   **_personal_cost(exp, pm))


REGISTRY = {
    "user_majority": ("no model: the user's most frequent label (headlines: title of the BM25-closest history article)", _user_majority),
    "global_majority": ("no model: the label most frequent over the other users' examples, for every query", _global_majority),
    "zero_shot": ("the frozen model, prompt only", _zero_shot),
    "rag": ("BM25 top-k of the user's history in the prompt (LaMP's retrieval baseline)", _rag),
    "task_lora": ("one LoRA (peft) on all other users, no per-user part", lambda e, c: _lora_method(e, c, "task_lora")),
    "oppu": ("task LoRA merged, then one LoRA per user on that user's history only", lambda e, c: _lora_method(e, c, "oppu")),
    "stage1": ("PerFit stage 1: collective shift + the shared initial personal module P0", _stage1),
    "perfit": ("collective shift + each user's personal shift", _perfit),
    "perfit_instant": ("collective shift + each user's shift from the shift generator (one pass, no training)",
                       lambda e, c: _perfit_mode(e, "perfit_instant", "instant")),
    "perfit_warm": ("collective shift + stage 2 started from the generated shift, for warm_epochs",
                    lambda e, c: _perfit_mode(e, "perfit_warm", "instant+train")),
    "perfit_stage2_only": ("personal shift of rank LRank+ULRank per user from scratch, no stage 1", _stage2_only),
}
assert tuple(REGISTRY) == METHODS


def run_method(cfg: CompareConfig, method: str) -> dict:
    """Train (if needed) and evaluate one method; returns its record."""
    cfg = cfg.resolved()
    exp = pipeline.prepare(cfg)
    return REGISTRY[method][1](exp, cfg)
