"""`perfit compare`: PerFit against its peers on the same model, data, users and queries, one table.

Every method runs in its own process by default (its peak memory is then its own and no method can leave the
model changed for the next), writes `<output_dir>/methods/<method>.json` atomically, and is skipped on a rerun
whose settings would not change it (the record's key is derived from the settings' declared effects). PerFit's
methods run through `PerFitModel`; the peers' trained parts (task LoRA, OPPU's per-user LoRAs) are stored under
`<output_dir>/<task>/baselines/`, keyed the same way, so changing a shift setting never retrains them.
The report is `comparison.json`, `comparison.md` and `comparison.png`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import resource
import subprocess
import sys
import time

import torch

from . import metrics, pipeline
from .backbone import load_backbone
from .config import METHODS, CompareConfig, artifact_keys, from_dict, to_dict
from .data import write_json_atomic
from .errors import PerFitError, user_message
from .generate import greedy_generate
from .model import PerFitModel

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
    from .baselines import retrieval

    t0 = time.perf_counter()
    preds = []
    task = exp.data.task
    for u in exp.data.test_users:
        items = pipeline.history_items(exp.cfg, u)
        index = None if task.has_labels else retrieval.UserIndex(task, items)
        preds += [retrieval.majority_answer(task, items, q.input, index, exp.builder.options(q.input)) for q in u.query]
    return _record(exp, "user_majority", preds, generate_seconds_per_query=(time.perf_counter() - t0) / len(preds))


def _zero_shot(exp, cfg) -> dict:
    pm = pipeline.open_model(exp)
    preds, gen_s = _timed_generate(pm, exp, variant="zero_shot", desc="zero_shot")
    return _record(exp, "zero_shot", preds, pm.device, generate_seconds_per_query=gen_s)


def _rag(exp, cfg) -> dict:
    from .baselines import retrieval

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

    from .baselines import lora
    from .batching import tokenize_examples
    from .store import save_safetensors_atomic

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
    from .baselines import lora
    from .batching import tokenize_examples
    from .store import UserStore, history_digest

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
REGISTRY = {
    "user_majority": ("no model: the user's most frequent label (headlines: title of the BM25-closest history article)", _user_majority),
    "zero_shot": ("the frozen model, prompt only", _zero_shot),
    "rag": ("BM25 top-k of the user's history in the prompt (LaMP's retrieval baseline)", _rag),
    "task_lora": ("one LoRA (peft) on all other users, no per-user part", lambda e, c: _lora_method(e, c, "task_lora")),
    "oppu": ("task LoRA merged, then one LoRA per user on that user's history only", lambda e, c: _lora_method(e, c, "oppu")),
    "stage1": ("PerFit stage 1: collective shift + the shared initial personal module P0", _stage1),
    "perfit": ("collective shift + each user's personal shift", _perfit),
    "perfit_stage2_only": ("personal shift of rank LRank+ULRank per user from scratch, no stage 1", _stage2_only),
}
assert tuple(REGISTRY) == METHODS


def run_method(cfg: CompareConfig, method: str) -> dict:
    """Train (if needed) and evaluate one method; returns its record."""
    cfg = cfg.resolved()
    exp = pipeline.prepare(cfg)
    return REGISTRY[method][1](exp, cfg)


def _fingerprints(cfg: CompareConfig) -> dict:
    return pipeline.prepare(cfg).fingerprints


# ---------------------------------------------------------------- orchestration and report

def _method_path(out: str, method: str) -> str:
    return os.path.join(out, "methods", f"{method}.json")


def compare(cfg: CompareConfig) -> dict:
    cfg = cfg.resolved()
    methods = cfg.method_list()
    exp = pipeline.prepare(cfg)
    fps = exp.fingerprints
    out = cfg.output_dir
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, "compare_config.json")
    write_json_atomic(cfg_path, to_dict(cfg))
    records = {}
    for m in methods:
        path = _method_path(out, m)
        rec = saved_record(cfg, m, fps)
        if rec is not None:
            log.info("compare: %s already done with these settings (%s)", m, path)
            records[m] = rec
            continue
        log.info("compare: running %s", m)
        t0 = time.perf_counter()
        if cfg.isolate:
            # the child reads the saved config, so it runs exactly these settings
            code = subprocess.run([sys.executable, "-m", "perfit.compare", "--config", cfg_path, "--method", m]).returncode
            if code == 2:  # the child printed the user-facing error already
                raise PerFitError(f"compare: {m} stopped on the error above; the methods before it are kept in "
                                  f"{os.path.join(out, 'methods')}")
            if code:
                raise RuntimeError(f"compare: {m} failed in its own process (exit {code}); its traceback is above")
            with open(path, encoding="utf-8") as f:
                rec = json.load(f)
        else:
            rec = save_record(cfg, m, run_method(cfg, m), fps)
        log.info("compare: %s done in %.1fs: %s", m, time.perf_counter() - t0, rec["metrics"])
        records[m] = rec
    return write_report(cfg, records, exp)


def saved_record(cfg: CompareConfig, method: str, fps: dict) -> dict | None:
    """`method`'s record from an earlier run with these settings and data (methods/<method>.json), if any."""
    path = _method_path(cfg.output_dir, method)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        rec = json.load(f)
    return rec if rec.get("key") == cfg.record_key(method, fps) else None


def save_record(cfg: CompareConfig, method: str, rec: dict, fps: dict) -> dict:
    """Keep `rec` as methods/<method>.json under the key of these settings and data."""
    rec = {"key": cfg.record_key(method, fps), **rec}
    write_json_atomic(_method_path(cfg.output_dir, method), rec)
    return rec


def default_reference(task) -> str:
    """The method others are measured against when none is named: the no-model per-user baseline where answers
    come from a closed set (labels, scores), the frozen model for free text."""
    return "user_majority" if task.has_labels else "zero_shot"


def _reference(cfg: CompareConfig, task, records: dict) -> str | None:
    if cfg.reference:
        return cfg.reference
    ref = default_reference(task)
    return ref if ref in records and len(records) > 1 else None


def write_report(cfg: CompareConfig, records: dict, exp) -> dict:
    """comparison.{json,md,png}. The primary metric carries its standard error over queries; with a reference
    method, each row also gets its paired difference from it on the same queries (a difference is real when it
    exceeds about twice its standard error)."""
    out = cfg.output_dir
    task = exp.data.task
    keys = metrics.report_keys(task)
    ref = _reference(cfg, task, records)
    table = {m: {k: v for k, v in r.items() if k not in ("predictions", "key")} for m, r in records.items()}
    if ref:
        for m, r in records.items():
            if m != ref:
                table[m]["vs_reference"] = {"reference": ref, **metrics.paired_difference(
                    task, exp.golds, r["predictions"], records[ref]["predictions"])}
    doc = {"task": cfg.task_name, "data_dir": cfg.data_dir or "(generated)", "model": cfg.model_path or cfg.model_name,
           "methods": table, "config": to_dict(cfg)}
    write_json_atomic(os.path.join(out, "comparison.json"), doc)
    any_rec = next(iter(records.values()))
    device = next((r["device"] for r in records.values() if "no model" not in r["device"]), "cpu")
    vs = [f"{keys[0]} − {ref}"] if ref else []
    lines = [f"**{cfg.task_name}**: {any_rec['users']} users, {any_rec['queries']} queries, model {doc['model']}, "
             f"device {device}. ± is one standard error over queries" + (f"; `{ref}` is the reference of the paired "
             "differences." if ref else ".") + (f" {keys[0]}: lower is better." if task.lower_is_better else ""), "",
             f"| method | {' | '.join([keys[0] + ' ± se'] + keys[1:] + vs)} | params / user | params shared | bytes / user "
             "| train s shared | train s / user | gen s / query | peak MiB |", "|---|" + "---:|" * (len(keys) + len(vs) + 7)]
    for m, r in records.items():
        mt = r["metrics"]
        cells = [f"{mt[keys[0]]:.3f} ± {mt.get(keys[0] + '_se', float('nan')):.3f}"] + [f"{mt[k]:.3f}" for k in keys[1:]]
        if ref:
            d = table[m].get("vs_reference")
            cells.append(f"{d['diff']:+.3f} ± {d['se']:.3f}" if d else "(reference)")
        lines.append(f"| {m} | " + " | ".join(cells)
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
    try:
        save_record(cfg, a.method, run_method(cfg, a.method), _fingerprints(cfg))
    except PerFitError as e:  # the user's to fix: one message, as the CLI prints it, not a traceback
        print(user_message(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
