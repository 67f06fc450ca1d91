"""`perfit compare`: PerFit against its peers on the same model, data, users and queries, one table.

Every method runs in its own process by default (its peak memory is then its own and no method can leave the
model changed for the next), writes `<output_dir>/methods/<method>.json` atomically, and is skipped on a rerun
with the same settings. The report is `comparison.json`, `comparison.md` and `comparison.png`.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time

import torch

from . import metrics
from .config import METHODS, CompareConfig, from_dict, to_dict
from .data import data_fingerprint, write_json_atomic

log = logging.getLogger("perfit")

WHAT = {
    "user_majority": "no model: the user's most frequent label (headlines: title of the BM25-closest history article)",
    "zero_shot": "the frozen model, prompt only",
    "rag": "BM25 top-k of the user's history in the prompt (LaMP's retrieval baseline)",
    "task_lora": "one LoRA (peft) on all other users, no per-user part",
    "oppu": "task LoRA merged, then one LoRA per user on that user's history only",
    "stage1": "PerFit stage 1: collective shift + the shared initial personal module P0",
    "perfit": "collective shift + each user's personal shift",
    "perfit_stage2_only": "personal shift of rank LRank+ULRank per user from scratch, no stage 1",
}


def peak_mib(device: torch.device | None = None) -> float:
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bytes_of(t: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in t.values())


def _record(ctx, method: str, preds: list[str], qids: list[str], **cost) -> dict:
    golds = {q.id: ctx.data.golds[q.id] for u in ctx.data.test_users for q in u.query}
    n_users = len(ctx.data.test_users)
    device = next(ctx.model.parameters()).device if ctx.model is not None else None
    rec = {"method": method, "what": WHAT[method], "metrics": metrics.evaluate(ctx.data.task, golds, dict(zip(qids, preds))),
           "users": n_users, "queries": len(qids), "params_shared": 0, "params_per_user": 0, "bytes_per_user": 0,
           "train_seconds_shared": 0.0, "train_seconds_per_user": 0.0, "generate_seconds_per_query": 0.0}
    rec.update(cost)
    rec["peak_memory_mib"] = round(peak_mib(device), 1)
    rec["device"] = str(device) if device is not None else "cpu (no model)"
    rec["predictions"] = dict(zip(qids, preds))
    for k in ("train_seconds_shared", "train_seconds_per_user", "generate_seconds_per_query"):
        rec[k] = round(rec[k], 4)
    return rec


def run_method(cfg: CompareConfig, method: str) -> dict:
    """Train (if needed) and evaluate one method; returns its record."""
    from . import pipeline
    from .baselines import retrieval

    ctx = pipeline.prepare(cfg, load_model=method != "user_majority")
    c, task = ctx.cfg, ctx.data.task
    qids = [q.id for u in ctx.data.test_users for q in u.query]
    if method == "user_majority":
        t0 = time.perf_counter()
        preds = []
        for u in ctx.data.test_users:
            items = pipeline.history_items(ctx, u)
            index = None if task.is_classification else retrieval.UserIndex(task, items)
            preds += [retrieval.majority_answer(task, items, q.input, index) for q in u.query]
        return _record(ctx, method, preds, qids, generate_seconds_per_query=(time.perf_counter() - t0) / len(qids))
    from .predict import greedy_generate
    from .train.batching import tokenize_prompt

    gen = dict(max_new_tokens=task.max_new_tokens, batch_size=c.eval_batch_size)
    limit = c.max_length - task.max_new_tokens
    _, prompts, owners = pipeline._query_prompts(ctx)
    n_users = len(ctx.data.test_users)
    if method in ("zero_shot", "rag"):
        if method == "rag":
            prompts = []
            for u in ctx.data.test_users:
                index = retrieval.UserIndex(task, pipeline.history_items(ctx, u))
                prompts += [tokenize_prompt(ctx.tok, retrieval.rag_prompt(task, ctx.builder.query_prompt(q.input), index.top(q.input, c.rag_k),
                                                                  c.rag_item_words), limit)
                            for q in u.query]
        t0 = time.perf_counter()
        preds = greedy_generate(ctx.model, ctx.tok, prompts, desc=method, **gen)
        return _record(ctx, method, preds, qids, generate_seconds_per_query=(time.perf_counter() - t0) / len(qids),
                       settings={"rag_k": c.rag_k, "rag_item_words": c.rag_item_words} if method == "rag" else {})
    if method in ("stage1", "perfit"):
        stage1 = pipeline.run_stage1(ctx)
        store = pipeline.run_stage2(ctx, stage1) if method == "perfit" else None
        ctx.timings.pop(f"{method}_predict_seconds", None)
        preds_by_id = pipeline.predict_variants(ctx, stage1, store, [method])[method]
        s1 = ctx.timings.get("stage1_train_seconds", 0.0)
        per_user = stage1.personal_parameters()
        cost = {"params_shared": stage1.collective_parameters() + per_user, "train_seconds_shared": s1,
                "generate_seconds_per_query": ctx.timings[f"{method}_predict_seconds"] / len(qids),
                "settings": {"lr": c.lr, "user_lr": c.user_lr, "stage1_epochs": c.stage1_epochs, "max_epoch": c.max_epoch,
                             "low_rank_dimension": c.low_rank_dimension, "user_low_rank_dimension": c.user_low_rank_dimension,
                             "layers": c.intervene_layer, "positions": c.positions, "shift_init": c.shift_init,
                             "query_cue": c.query_cue}}
        if store is not None:
            cost |= {"params_per_user": per_user, "bytes_per_user": store.bytes_per_user(),
                     "train_seconds_per_user": sum(store.index[u.user_id]["train_seconds"] for u in ctx.data.test_users) / n_users}
        return _record(ctx, method, [preds_by_id[q] for q in qids], qids, **cost)
    if method == "perfit_stage2_only":
        return _stage2_only(ctx, prompts, owners, qids)
    return _lora_method(ctx, method, prompts, owners, qids)


def _stage2_only(ctx, prompts, owners, qids) -> dict:
    from . import pipeline
    from .shifts import Shifter
    from .store import UserStore

    c = ctx.cfg
    rank = c.low_rank_dimension + c.user_low_rank_dimension
    device = next(ctx.model.parameters()).device

    def make(n: int) -> Shifter:
        sh = Shifter(ctx.info.hidden_size, c.layers, 0, rank, n, c.seed, c.shift_init)
        sh.set_all_personal(sh)  # every user starts from the same random module
        return sh.to(device)

    store = UserStore(os.path.join(ctx.run_dir, "stage2_only_users"),
                      {"hidden_size": ctx.info.hidden_size, "layers": c.layers, "user_low_rank_dimension": rank,
                       "positions": c.positions, "max_epoch": c.max_epoch, "user_lr": c.user_lr, "batch_size": c.batch_size,
                       "shift_init": c.shift_init,
                       "max_history": c.max_history, "seed": c.seed, "task_name": c.task_name, "data": ctx.stage1_key})
    pipeline.train_personal(ctx, store, make, label="stage-2-only")
    t0 = time.perf_counter()
    preds = pipeline.predict_personal(ctx, store, make, prompts, owners, desc="stage-2-only")
    n = len(ctx.data.test_users)
    return _record(ctx, "perfit_stage2_only", preds, qids, params_per_user=make(1).personal_parameters(),
                   bytes_per_user=store.bytes_per_user(), generate_seconds_per_query=(time.perf_counter() - t0) / len(qids),
                   train_seconds_per_user=sum(store.index[u.user_id]["train_seconds"] for u in ctx.data.test_users) / n,
                   settings={"user_lr": c.user_lr, "max_epoch": c.max_epoch, "rank": rank, "layers": c.intervene_layer,
                             "positions": c.positions, "shift_init": c.shift_init})


def _task_lora(ctx):
    """The task LoRA trained on every stage-1 example, or loaded when already trained with the same settings.
    Returns (peft model, seconds it took to train)."""
    from safetensors.torch import load_file

    from .baselines import lora
    from .store import save_safetensors_atomic
    from .train import tokenize_examples

    c = ctx.cfg
    pm = lora.add_lora(ctx.model, c.lora_rank, c.lora_alpha, c.lora_targets, c.seed)
    folder = os.path.join(ctx.run_dir, "task_lora")
    # what the task LoRA depends on: the stage-1 data and its sampling, the model, the LoRA settings (not the shifts')
    shared = [getattr(c, k) for k in ("task_name", "model_name", "model_path", "dtype", "seed", "batch_size", "stage1_epochs",
                                      "max_stage1_examples", "max_field_words", "max_length", "prompts_file", "query_cue")]
    key = hashlib.sha256(json.dumps([data_fingerprint([ctx.data.others_path]), shared, c.lora_rank, c.lora_alpha,
                                     c.lora_targets, c.lora_lr]).encode()).hexdigest()[:16]
    meta_path = os.path.join(folder, "config.json")
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("key") == key:
            lora.load_adapter(pm, load_file(os.path.join(folder, "adapter.safetensors")))
            return pm, meta["train_seconds"]
    ex = tokenize_examples(ctx.tok, ctx.stage1_examples, c.max_length)
    stats = lora.train_lm(ctx.model, ex, epochs=c.stage1_epochs, batch_size=c.batch_size, lr=c.lora_lr,
                          pad_id=ctx.tok.pad_token_id, seed=c.seed, key="task", desc="task LoRA")
    log.info("task LoRA: %d examples, loss %.3f -> %.3f, %.1fs", len(ex), stats["first_loss"], stats["last_loss"], stats["seconds"])
    save_safetensors_atomic(os.path.join(folder, "adapter.safetensors"), lora.adapter_state(pm), {"key": key})
    write_json_atomic(meta_path, {"key": key, "train_seconds": stats["seconds"], "stats": stats, "peft_config": pm.peft_config["default"].to_dict() | {"target_modules": sorted(pm.peft_config["default"].target_modules)},
                                  "run_config": to_dict(c)})
    return pm, stats["seconds"]


def _lora_method(ctx, method: str, prompts, owners, qids) -> dict:
    from .baselines import lora
    from .predict import greedy_generate
    from .store import UserStore
    from .train import tokenize_examples
    from . import pipeline

    c, task = ctx.cfg, ctx.data.task
    gen = dict(max_new_tokens=task.max_new_tokens, batch_size=c.eval_batch_size)
    pm, shared_s = _task_lora(ctx)
    shared_params = lora.lora_parameters(pm)
    settings = {"lora_rank": c.lora_rank, "lora_alpha": c.lora_alpha, "lora_targets": c.lora_targets, "lora_lr": c.lora_lr,
                "epochs": c.stage1_epochs}
    if method == "task_lora":
        t0 = time.perf_counter()
        preds = greedy_generate(ctx.model, ctx.tok, prompts, desc="task LoRA", **gen)
        return _record(ctx, method, preds, qids, params_shared=shared_params, train_seconds_shared=shared_s,
                       generate_seconds_per_query=(time.perf_counter() - t0) / len(qids), settings=settings)
    # OPPU: the task LoRA becomes part of the base, then each user gets a fresh LoRA of its own
    base = pm.merge_and_unload()
    upm = lora.add_lora(base, c.lora_rank, c.lora_alpha, c.lora_targets, c.seed + 1)
    init = lora.adapter_state(upm)
    store = UserStore(os.path.join(ctx.run_dir, "oppu_users"),
                      {"task_lora": ctx.stage1_key, "lora_rank": c.lora_rank, "lora_alpha": c.lora_alpha, "lora_targets": c.lora_targets,
                       "lora_lr": c.lora_lr, "oppu_lr": c.oppu_lr, "max_epoch": c.max_epoch, "batch_size": c.batch_size,
                       "max_history": c.max_history, "seed": c.seed, "task_name": c.task_name})
    preds = [""] * len(prompts)
    gen_s = 0.0
    for u in ctx.data.test_users:
        if u.user_id in store:
            lora.load_adapter(upm, store.get(u.user_id))
        else:
            lora.load_adapter(upm, init)
            ex = tokenize_examples(ctx.tok, pipeline.user_history(ctx, u), c.max_length)
            stats = lora.train_lm(base, ex, epochs=c.max_epoch, batch_size=c.batch_size, lr=c.oppu_lr,
                                  pad_id=ctx.tok.pad_token_id, seed=c.seed, key=u.user_id, desc=f"OPPU {u.user_id}")
            store.put_tensors(u.user_id, lora.adapter_state(upm), {"examples": len(ex), "train_seconds": round(stats["seconds"], 3)})
        rows = [i for i, o in enumerate(owners) if o == u.user_id]
        t0 = time.perf_counter()
        got = greedy_generate(base, ctx.tok, [prompts[i] for i in rows], desc=f"OPPU {u.user_id}", **gen)
        gen_s += time.perf_counter() - t0
        for i, p in zip(rows, got):
            preds[i] = p
    n = len(ctx.data.test_users)
    return _record(ctx, method, preds, qids, params_shared=shared_params, params_per_user=lora.lora_parameters(upm),
                   bytes_per_user=store.bytes_per_user(), train_seconds_shared=shared_s,
                   train_seconds_per_user=sum(store.index[u.user_id]["train_seconds"] for u in ctx.data.test_users) / n,
                   generate_seconds_per_query=gen_s / len(qids), settings=settings | {"oppu_lr": c.oppu_lr, "user_epochs": c.max_epoch})


# ---------------------------------------------------------------- orchestration and report

def _method_path(out: str, method: str) -> str:
    return os.path.join(out, "methods", f"{method}.json")


def compare(cfg: CompareConfig) -> dict:
    cfg = cfg.resolved()
    methods = cfg.method_list()
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, "compare_config.json")
    write_json_atomic(cfg_path, to_dict(cfg))
    records = {}
    for m in methods:
        path = _method_path(out, m)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
            if rec.get("key") == cfg.key(m):
                log.info("compare: %s already done with these settings (%s)", m, path)
                records[m] = rec
                continue
        log.info("compare: running %s", m)
        t0 = time.perf_counter()
        if cfg.isolate:
            # the child reads the saved config, so it runs exactly these settings
            subprocess.run([sys.executable, "-m", "perfit.compare", "--config", cfg_path, "--method", m], check=True)
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
        else:
            rec = _save(cfg, m, run_method(cfg, m))
        log.info("compare: %s done in %.1fs: %s", m, time.perf_counter() - t0, rec["metrics"])
        records[m] = rec
    return write_report(cfg, records)


def _save(cfg: CompareConfig, method: str, rec: dict) -> dict:
    rec = {"key": cfg.key(method), **rec}
    write_json_atomic(_method_path(cfg.output_dir, method), rec)
    return rec


def _metric_keys(records: dict) -> list[str]:
    m = next(iter(records.values()))["metrics"]
    return ["accuracy", "f1"] if "accuracy" in m else ["rouge-1", "rouge-L"]


def write_report(cfg: CompareConfig, records: dict) -> dict:
    out = cfg.output_dir
    keys = _metric_keys(records)
    table = {m: {k: v for k, v in r.items() if k not in ("predictions", "key")} for m, r in records.items()}
    doc = {"task": cfg.task_name, "data_dir": cfg.data_dir or "(generated)", "model": cfg.model_path or cfg.model_name,
           "methods": table, "config": to_dict(cfg)}
    write_json_atomic(os.path.join(out, "comparison.json"), doc)
    any_rec = next(iter(records.values()))
    device = next((r["device"] for r in records.values() if "no model" not in r["device"]), "cpu")
    lines = [f"**{cfg.task_name}**: {any_rec['users']} users, {any_rec['queries']} queries, model {doc['model']}, "
             f"device {device}.", "",
             f"| method | {' | '.join(keys)} | params / user | params shared | bytes / user | train s shared | train s / user "
             "| gen s / query | peak MiB |", "|---|" + "---:|" * (len(keys) + 7)]
    for m, r in records.items():
        lines.append(f"| {m} | " + " | ".join(f"{r['metrics'][k]:.3f}" for k in keys)
                     + f" | {r['params_per_user']:,} | {r['params_shared']:,} | {int(r['bytes_per_user']):,} | {r['train_seconds_shared']:.1f}"
                     f" | {r['train_seconds_per_user']:.2f} | {r['generate_seconds_per_query']:.3f} | {r['peak_memory_mib']:.0f} |")
    with open(os.path.join(out, ".comparison.md.tmp"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(out, ".comparison.md.tmp"), os.path.join(out, "comparison.md"))
    plot(records, keys[0], os.path.join(out, "comparison.png"), f"{cfg.task_name}: {any_rec['users']} users")
    return doc


def plot(records: dict, metric: str, path: str, title: str) -> None:
    """Quality against per-user cost (training seconds, bytes stored), one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (field, label) in zip(axes, (("train_seconds_per_user", "training seconds per user"),
                                         ("bytes_per_user", "bytes stored per user"))):
        at: dict = {}  # methods on the same spot share one label
        for m, r in records.items():
            at.setdefault((r[field], r["metrics"][metric]), []).append(m)
        for (x, y), ms in at.items():
            ax.scatter([x], [y], s=60, color="tab:red" if any(m.startswith("perfit") for m in ms) else "tab:blue")
            ax.annotate(", ".join(ms), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        thresh = 1.0 if field == "train_seconds_per_user" else 1000.0
        ax.set_xscale("symlog", linthresh=thresh)
        ax.margins(x=0.15, y=0.08)  # room for the labels of the outermost points
        top = max([r[field] for r in records.values()] + [thresh])
        ax.set_xticks([0.0] + [thresh * 10**k for k in range(0, int(math.log10(top / thresh)) + 2)])
        ax.set_xlabel(label + " (0 = none)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    fig.suptitle(f"{title}: {metric} against per-user cost (red: PerFit)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _child(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="run one method of `perfit compare` (internal)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--method", required=True, choices=METHODS)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[perfit] %(message)s", stream=sys.stderr)
    with open(a.config, encoding="utf-8") as f:
        cfg = from_dict(CompareConfig, json.load(f))
    _save(cfg, a.method, run_method(cfg, a.method))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
