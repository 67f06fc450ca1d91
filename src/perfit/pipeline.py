"""`perfit run`: data -> stage 1 -> stage 2 -> predictions -> metrics -> outputs."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

from . import metrics
from .backbone import check_layers, load_backbone
from .config import RunConfig, from_dict, to_dict
from .data import DataError, Query, TaskData, User, data_fingerprint, load_task_data, write_json_atomic
from .data.synthetic import generate
from .predict import greedy_generate
from .prompts import Example, PromptBuilder
from .shifts import Shifter, parse_positions
from .store import UserStore, save_safetensors_atomic
from .train import tokenize_examples, train_shifts
from .train.batching import tokenize_prompt

log = logging.getLogger("perfit")
DATA_TYPE = "user_top_100_history"
CKPT = os.path.join("task_reft", "ckpt")
VARIANTS = ("zero_shot", "stage1", "perfit")


@dataclass
class Context:
    cfg: RunConfig
    data: TaskData
    run_dir: str
    model: object = None
    tok: object = None
    info: object = None
    builder: PromptBuilder = None  # type: ignore[assignment]
    stage1_examples: list[Example] = field(default_factory=list)
    stage1_key: str = ""
    timings: dict = field(default_factory=dict)

    @property
    def first_last(self) -> tuple[int, int]:
        return parse_positions(self.cfg.positions)


def ensure_data(cfg: RunConfig) -> str:
    """The data folder to use; generated data (with known preferences) is made on first use."""
    if cfg.data_dir:
        return cfg.data_dir
    d = os.path.join(cfg.output_dir, "data", f"generated_seed={cfg.seed}_users={cfg.num_users}")
    if not os.path.isfile(os.path.join(d, cfg.task_name, "user_top_100_history_label.json")):
        log.info("no --data_dir: generating %s data with known per-user preferences in %s", cfg.task_name, d)
        generate(cfg.task_name, d, cfg.num_users, cfg.history_per_user, cfg.queries_per_user, cfg.num_other_users, cfg.seed)
    return d


def _even_cap(per_user: list[list[Example]], n: int) -> list[Example]:
    """At most n examples, taken round-robin across users so every user is represented."""
    if n <= 0:
        return [e for u in per_user for e in u]
    out, k = [], 0
    while len(out) < n and any(k < len(u) for u in per_user):
        out += [u[k] for u in per_user if k < len(u)][: n - len(out)]
        k += 1
    return out


def holdout_split(td: TaskData, builder: PromptBuilder, n: int) -> TaskData:
    """Tuning data that never touches the test queries: each test user's last n history items become its queries
    (prompted like history, gold = the item's answer) and the items before them its history. Users with no more
    than n items are left out."""
    users, golds = [], {}
    for u in td.test_users:
        if len(u.profile) <= n:
            continue
        queries = []
        for k, it in enumerate(u.profile[-n:]):
            ex = builder.history_example(it, u.user_id)
            queries.append(Query(f"holdout:{u.user_id}:{k}:{it.get('id', '')}", ex.prompt, ex.target.strip()))
            golds[queries[-1].id] = queries[-1].gold
        users.append(User(u.user_id, u.profile[:-n], queries))
    if not users:
        raise DataError([f"{td.data_dir}: --holdout {n} leaves no test user with history to train on"])
    return dataclasses.replace(td, test_users=users, golds=golds)


def prepare(cfg: RunConfig, load_model: bool = True) -> Context:
    cfg = cfg.resolved()
    data_dir = ensure_data(cfg)
    cfg = dataclasses.replace(cfg, data_dir=data_dir)
    td = load_task_data(data_dir, cfg.task_name)
    if cfg.max_users > 0:
        td.test_users = td.test_users[: cfg.max_users]
    builder = PromptBuilder(td.task, cfg.prompts_file or None, cfg.max_field_words, bool(cfg.query_cue))
    if cfg.holdout > 0:
        td = holdout_split(td, builder, cfg.holdout)
    # one streaming pass over user_others.json: validated and turned into examples at once
    per_user = [builder.user_examples(u, include_gold_queries=True) for u in td.iter_others()]
    stage1 = _even_cap(per_user, cfg.max_stage1_examples)
    if not stage1:
        raise DataError([f"{td.others_path}: no stage-1 examples (no history items nor queries with gold)"])
    run_dir = os.path.join(cfg.output_dir, cfg.task_name, cfg.run_dir_name or cfg.default_run_dir())
    ctx = Context(cfg, td, run_dir, builder=builder, stage1_examples=stage1)
    ctx.stage1_key = cfg.stage1_key(data_fingerprint([td.others_path]))
    if load_model:
        ctx.model, ctx.tok, ctx.info = load_backbone(cfg.model_path, cfg.dtype, cfg.cuda_device, cfg.model_name)
        check_layers(ctx.model, cfg.layers)
    return ctx


def _new_shifter(ctx: Context, num_users: int) -> Shifter:
    c = ctx.cfg
    return Shifter(ctx.info.hidden_size, c.layers, c.low_rank_dimension, c.user_low_rank_dimension, num_users, c.seed,
                   c.shift_init)


def _shift_config(ctx: Context) -> dict:
    c = ctx.cfg
    return {"hidden_size": ctx.info.hidden_size, "layers": c.layers, "low_rank_dimension": c.low_rank_dimension,
            "user_low_rank_dimension": c.user_low_rank_dimension, "positions": c.positions, "stage1_key": ctx.stage1_key}


def load_stage1(ckpt_dir: str, model=None) -> tuple[Shifter, dict]:
    """Load a stage-1 checkpoint on its own (its config.json says everything needed)."""
    with open(os.path.join(ckpt_dir, "config.json"), encoding="utf-8") as f:
        meta = json.load(f)
    sc = meta["shift"]
    sh = Shifter(sc["hidden_size"], sc["layers"], sc["low_rank_dimension"], sc["user_low_rank_dimension"], 1)
    sh.load_state_dict(load_file(os.path.join(ckpt_dir, "shifts.safetensors")))
    if model is not None:
        sh.to(next(model.parameters()).device).attach(model)
    return sh, meta


def _train_kw(ctx: Context) -> dict:
    c = ctx.cfg
    return dict(max_rows=c.rows_per_pass, cache_max_bytes=c.cache_max_bytes, disk_cache_max_bytes=c.disk_cache_max_bytes,
                disk_cache_dir=c.disk_cache_dir or os.path.join(ctx.run_dir, "cache"))


def run_stage1(ctx: Context) -> Shifter:
    c = ctx.cfg
    ckpt = os.path.join(ctx.run_dir, CKPT)
    if os.path.isfile(os.path.join(ckpt, "config.json")):
        with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("stage1_key") == ctx.stage1_key:
            log.info("stage 1: reusing checkpoint %s (same stage-1 settings and data)", ckpt)
            ctx.timings["stage1_train_seconds"] = meta.get("train_seconds", 0.0)
            return load_stage1(ckpt, ctx.model)[0]
        log.info("stage 1: checkpoint %s was made with other settings or data: retraining", ckpt)
    sh = _new_shifter(ctx, 1).to(next(ctx.model.parameters()).device).attach(ctx.model)
    first, last = ctx.first_last
    ex = tokenize_examples(ctx.tok, ctx.stage1_examples, c.max_length)
    for e in ex:
        e.module, e.key = 0, "stage1"
    stats = train_shifts(ctx.model, sh, ex, epochs=c.stage1_epochs, batch_size=c.batch_size, lr=c.lr, train_collective=True,
                         pad_id=ctx.tok.pad_token_id, first=first, last=last, seed=c.seed, desc="stage 1",
                         **_train_kw(ctx))
    log.info("stage 1: %d examples, %d steps, loss by epoch %s, %.1fs", len(ex), stats.steps, stats.epoch_losses, stats.seconds)
    ctx.timings["stage1_train_seconds"] = stats.seconds
    meta = {"stage1_key": ctx.stage1_key, "run_config": to_dict(c), "shift": _shift_config(ctx), "model": dataclasses.asdict(ctx.info),
            "examples": len(ex), "train_seconds": stats.seconds, "stats": dataclasses.asdict(stats)}
    # written to a temporary folder and renamed, so a crash never leaves a checkpoint that half-loads
    parent = os.path.dirname(ckpt)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".ckpt-")
    save_safetensors_atomic(os.path.join(tmp, "shifts.safetensors"), sh.state_dict(), {"stage1_key": ctx.stage1_key})
    write_json_atomic(os.path.join(tmp, "config.json"), meta)
    if os.path.isdir(ckpt):
        shutil.rmtree(ckpt)
    os.replace(tmp, ckpt)
    return sh


def _store(ctx: Context) -> UserStore:
    c = ctx.cfg
    conf = _shift_config(ctx) | {"max_epoch": c.max_epoch, "user_lr": c.user_lr, "batch_size": c.batch_size,
                                 "max_history": c.max_history, "seed": c.seed, "task_name": c.task_name}
    return UserStore(os.path.join(ctx.run_dir, "users"), conf)


def _init_from_stage1(ctx: Context, stage1: Shifter, n: int) -> Shifter:
    """n personal modules, each a copy of the initial personal module P0; the collective one frozen."""
    sh = _new_shifter(ctx, n)
    sh.collective.load_state_dict(stage1.collective.state_dict())
    sh.set_all_personal(stage1)
    return sh.to(next(ctx.model.parameters()).device)


def history_items(ctx: Context, user) -> list[dict]:
    """The history a user's personal stage trains on (its latest max_history items)."""
    return user.profile[-ctx.cfg.max_history:] if ctx.cfg.max_history > 0 else user.profile


def user_history(ctx: Context, user) -> list[Example]:
    return [ctx.builder.history_example(it, user.user_id) for it in history_items(ctx, user)]


def train_personal(ctx: Context, store: UserStore, make_shifter, label: str = "stage 2") -> UserStore:
    """Personal shifts for every test user not yet in `store`, trained user_group_size users at a time in one
    batched loop; `make_shifter(n)` gives n initial personal modules. Each group is stored as soon as it is done."""
    c = ctx.cfg
    todo = [u for u in ctx.data.test_users if u.user_id not in store]
    if len(todo) < len(ctx.data.test_users):
        log.info("%s: %d users already in the store, %d to train", label, len(ctx.data.test_users) - len(todo), len(todo))
    first, last = ctx.first_last
    for g in range(0, len(todo), c.user_group_size):
        group = todo[g: g + c.user_group_size]
        module_of = {u.user_id: k for k, u in enumerate(group)}
        sh = make_shifter(len(group)).attach(ctx.model)
        ex = tokenize_examples(ctx.tok, [e for u in group for e in user_history(ctx, u)], c.max_length, module_of)
        stats = train_shifts(ctx.model, sh, ex, epochs=c.max_epoch, batch_size=c.batch_size, lr=c.user_lr,
                             train_collective=False, pad_id=ctx.tok.pad_token_id, first=first, last=last, seed=c.seed,
                             **_train_kw(ctx), desc=f"{label} users {g + 1}-{g + len(group)}/{len(todo)}")
        sh.detach()
        n_of = {u.user_id: sum(1 for e in ex if e.module == module_of[u.user_id]) for u in group}
        store.put_many(sh, module_of, {u: {"examples": n, "train_seconds": round(stats.seconds / len(group), 3)}
                                       for u, n in n_of.items()})
        log.info("%s: stored %d users (loss by epoch %s, %.1fs)", label, len(group), stats.epoch_losses, stats.seconds)
    return store


def run_stage2(ctx: Context, stage1: Shifter) -> UserStore:
    """Stage 2: each test user's shift starts from P0 on top of the frozen collective shift."""
    stage1.detach()
    try:
        return train_personal(ctx, _store(ctx), lambda n: _init_from_stage1(ctx, stage1, n))
    finally:
        stage1.attach(ctx.model)


def predict_personal(ctx: Context, store: UserStore, make_shifter, prompts: list[list[int]], owners: list[str],
                     desc: str = "perfit") -> list[str]:
    """Generate every prompt with its owner's stored shift, user_group_size users per batched pass."""
    c, first_last = ctx.cfg, ctx.first_last
    preds = [""] * len(prompts)
    users = list(dict.fromkeys(owners))
    for g in range(0, len(users), c.user_group_size):
        group = users[g: g + c.user_group_size]
        module_of = {u: k for k, u in enumerate(group)}
        sh = make_shifter(len(group))
        store.load_into(sh, module_of)
        sh.attach(ctx.model)
        rows = [i for i, o in enumerate(owners) if o in module_of]
        got = greedy_generate(ctx.model, ctx.tok, [prompts[i] for i in rows], [module_of[owners[i]] for i in rows], sh,
                              max_new_tokens=ctx.data.task.max_new_tokens, batch_size=c.eval_batch_size,
                              first=first_last[0], last=first_last[1], desc=desc)
        sh.detach()
        for i, p in zip(rows, got):
            preds[i] = p
    return preds


def _query_prompts(ctx: Context) -> tuple[list[str], list[list[int]], list[str]]:
    c = ctx.cfg
    ids, prompts, owners = [], [], []
    limit = c.max_length - ctx.data.task.max_new_tokens
    for u in ctx.data.test_users:
        for q in u.query:
            ids.append(q.id)
            prompts.append(tokenize_prompt(ctx.tok, ctx.builder.query_example(q, u.user_id).prompt, limit))
            owners.append(u.user_id)
    return ids, prompts, owners


def predict_variants(ctx: Context, stage1: Shifter, store: UserStore | None, variants=VARIANTS) -> dict:
    """{variant: {query id: prediction}}, plus generation seconds per variant in ctx.timings."""
    c, task = ctx.cfg, ctx.data.task
    first, last = ctx.first_last
    qids, prompts, owners = _query_prompts(ctx)
    out: dict[str, dict[str, str]] = {}
    gen = dict(max_new_tokens=task.max_new_tokens, batch_size=c.eval_batch_size, first=first, last=last)
    for v in variants:
        t0 = time.perf_counter()
        if v == "zero_shot":
            stage1.detach()
            preds = greedy_generate(ctx.model, ctx.tok, prompts, desc="zero-shot", **gen)
            stage1.attach(ctx.model)
        elif v == "stage1":
            preds = greedy_generate(ctx.model, ctx.tok, prompts, [0] * len(prompts), stage1, desc="stage 1", **gen)
        else:
            stage1.detach()
            preds = predict_personal(ctx, store, lambda n: _init_from_stage1(ctx, stage1, n), prompts, owners)
            stage1.attach(ctx.model)
        ctx.timings[f"{v}_predict_seconds"] = time.perf_counter() - t0
        out[v] = dict(zip(qids, preds))
    return out


def write_outputs(ctx: Context, preds: dict, stage1: Shifter, store: UserStore) -> dict:
    task, golds = ctx.data.task, {q.id: ctx.data.golds[q.id] for u in ctx.data.test_users for q in u.query}
    run = ctx.run_dir
    t = ctx.timings
    # stage-2 time is the stored users' own training time, so a later `predict` reports it too
    s1 = t.get("stage1_train_seconds", 0.0)
    s2 = sum(store.index.get(u.user_id, {}).get("train_seconds", 0.0) for u in ctx.data.test_users)
    n_users = len(ctx.data.test_users)
    results = {"task": task.name, "run_dir": run, "model": dataclasses.asdict(ctx.info), "variants": {}}
    train_s = {"zero_shot": 0.0, "stage1": s1, "perfit": s1 + s2}
    for v, p in preds.items():
        m = metrics.evaluate(task, golds, p)
        results["variants"][v] = {
            "metrics": m, "queries": len(p),
            "trainable_parameters": {"collective": 0 if v == "zero_shot" else stage1.collective_parameters() + stage1.personal_parameters(),
                                     "per_user": stage1.personal_parameters() if v == "perfit" else 0},
            "train_seconds": round(train_s[v], 2), "predict_seconds": round(t.get(f"{v}_predict_seconds", 0.0), 2),
            "wall_seconds": round(train_s[v] + t.get(f"{v}_predict_seconds", 0.0), 2),
        }
    results["notes"] = ("stage1 = collective shift + the initial personal module P0 shared by all users (no per-user "
                        "training); perfit = collective + each user's own shift; stage-2 train_seconds covers all "
                        f"{n_users} users.")
    write_json_atomic(os.path.join(run, f"perfit_data_type={DATA_TYPE}", "predictions.json"), metrics.preds_document(task, preds["perfit"]))
    for v in preds:
        if v != "perfit":
            write_json_atomic(os.path.join(run, f"perfit_data_type={DATA_TYPE}", f"predictions_{v}.json"),
                              metrics.preds_document(task, preds[v]))
    per_user = [{"user_id": u.user_id,
                 "query": [{"id": q.id, "gold": golds[q.id], **{v: preds[v][q.id] for v in preds}} for q in u.query]}
                for u in ctx.data.test_users]
    write_json_atomic(os.path.join(run, f"result_data_type={DATA_TYPE}", f"{DATA_TYPE}_all.json"), per_user)
    write_json_atomic(os.path.join(run, "config.json"), to_dict(ctx.cfg))
    write_json_atomic(os.path.join(run, "results.json"), results)
    return results


def summary_table(results: dict) -> str:
    task = results["task"]
    keys = ["accuracy", "f1"] if "accuracy" in next(iter(results["variants"].values()))["metrics"] else ["rouge-1", "rouge-L"]
    lines = [f"{task}: " + " | ".join(f"{v} " + "/".join(f"{r['metrics'][k]:.3f}" for k in keys)
                                        for v, r in results["variants"].items()) + f"  ({'/'.join(keys)}, n={next(iter(results['variants'].values()))['queries']})"]
    return "\n".join(lines)


def run(cfg: RunConfig) -> dict:
    ctx = prepare(cfg)
    stage1 = run_stage1(ctx)
    store = run_stage2(ctx, stage1)
    preds = predict_variants(ctx, stage1, store)
    return write_outputs(ctx, preds, stage1, store)


def stage1_only(cfg: RunConfig) -> str:
    ctx = prepare(cfg)
    run_stage1(ctx)
    return os.path.join(ctx.run_dir, CKPT)


def _require_stage1(ctx: Context) -> Shifter:
    ckpt = os.path.join(ctx.run_dir, CKPT)
    if not os.path.isfile(os.path.join(ckpt, "config.json")):
        raise FileNotFoundError(f"{ckpt}: no stage-1 checkpoint; run `perfit stage1` with the same settings first")
    sh, meta = load_stage1(ckpt, ctx.model)
    if meta.get("stage1_key") != ctx.stage1_key:
        raise ValueError(f"{ckpt}: the stage-1 checkpoint was made with other settings or data; rerun `perfit stage1`")
    ctx.timings["stage1_train_seconds"] = meta.get("train_seconds", 0.0)
    return sh


def stage2_only(cfg: RunConfig) -> str:
    ctx = prepare(cfg)
    return run_stage2(ctx, _require_stage1(ctx)).root


def predict_only(cfg: RunConfig) -> dict:
    ctx = prepare(cfg)
    stage1 = _require_stage1(ctx)
    store = _store(ctx)
    missing = [u.user_id for u in ctx.data.test_users if u.user_id not in store]
    if missing:
        raise FileNotFoundError(f"{store.root}: no personal shift for users {missing[:10]}; run `perfit stage2` first")
    return write_outputs(ctx, predict_variants(ctx, stage1, store), stage1, store)


def load_run_config(run_dir: str) -> RunConfig:
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        return from_dict(RunConfig, json.load(f))
