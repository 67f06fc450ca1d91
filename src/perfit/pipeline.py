"""Experiments on data files: `perfit run / stage1 / stage2 / predict`. Data -> stage 1 -> stage 2 -> predictions ->
metrics -> the seed's output layout. All model work goes through `PerFitModel`; this module only reads the task's
files, decides what can be reused, and writes the outputs."""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field

from safetensors.torch import load, save

from . import dist, metrics, plan
from .backbone import Backbone, load_backbone
from .config import RunConfig, check_run_overrides, parse_budget
from .data import DataError, OverlapCheck, Query, TaskData, User, data_fingerprint, latest, load_task_data, write_json_atomic
from .data.synthetic import generate
from .errors import ConfigError, RunStateError
from .model import VARIANTS, PerFitModel
from .rundir import CKPT, CKPT_TENSORS, GENERATOR, USERS, artifact_key, load_collective_from, load_run_config, store_path
from .batching import frozen_prefix_columns, tokenize_examples
from .prefix import can_splice, kv_shape
from .prompts import Example, PromptBuilder
from .train.cost import SAMPLE_EXAMPLES

log = logging.getLogger("perfit")
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    """tune and compare prepare the same experiment several times in one process: say each overlap once."""
    if msg not in _warned:
        _warned.add(msg)
        log.warning("%s", msg)


DATA_TYPE = "user_top_100_history"


@dataclass
class Experiment:
    """A run's settings and data: the test users (capped, or held out for tuning), the prompt builder, the run dir and
    the identity of the data the artifacts are keyed on."""
    cfg: RunConfig
    data: TaskData
    builder: PromptBuilder
    run_dir: str
    fingerprints: dict
    timings: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)  # what plan_run estimated and decided; results.json keeps it
    # when the command began (prepare): loading the model and planning come before the stages and count against the budget
    started: float = field(default_factory=time.perf_counter)

    @property
    def queries(self) -> tuple[list[str], list[str], list[str]]:
        """(query ids, owners, inputs) of every test query, users in order."""
        rows = [(q.id, u.user_id, q.input) for u in self.data.test_users for q in u.query]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    @property
    def golds(self) -> dict[str, str]:
        return {q.id: self.data.golds[q.id] for u in self.data.test_users for q in u.query}


def ensure_data(cfg: RunConfig) -> str:
    """The data folder to use; generated data (with known preferences) is made on first use, in a folder named by
    every generation setting."""
    if cfg.data_dir:
        return cfg.data_dir
    gen = [cfg.seed, cfg.num_users, cfg.num_other_users, cfg.history_per_user, cfg.queries_per_user]
    d = os.path.join(cfg.output_dir, "data", f"generated_seed={cfg.seed}_users={cfg.num_users}_"
                     + hashlib.sha256(json.dumps(gen).encode()).hexdigest()[:8])
    if not os.path.isfile(os.path.join(d, cfg.task_name, "user_top_100_history_label.json")):
        log.info("no --data_dir: generating %s data with known per-user preferences in %s", cfg.task_name, d)
        generate(cfg.task_name, d, cfg.num_users, cfg.history_per_user, cfg.queries_per_user, cfg.num_other_users, cfg.seed)
    return d


def holdout_split(td: TaskData, builder: PromptBuilder, n: int) -> TaskData:
    """Tuning data that never touches the test queries: each test user's last n history items become its queries
    (prompted like history, gold = the item's answer) and the items before them its history. Users with no more
    than n items are left out. A task whose items carry no answer from its label set (citation: a paper is not a
    [1] / [2] question), or whose history prompt reads nothing of the item (tweet_paraphrase), has no held-out
    queries to make."""
    if td.task.has_labels and not td.task.labelled_items:
        raise ConfigError(f"--holdout: {td.task.name}'s history items carry no answer of its own ({', '.join(td.task.labels)}), "
                          f"so they make no held-out queries; tune on the task's other users or on a task whose items "
                          f"are answered")
    if not builder.prompt_fields:  # tweet_paraphrase's "tweet:": no query of the task's shape to make from an item
        raise ConfigError(f"--holdout: {td.task.name}'s history prompt {builder.tpl['prompt']!r} reads no field of the "
                          f"item, so every held-out query would be that same text and no paraphrase of the item; "
                          f"tune on a task whose history prompt reads the item (or give one with --prompts_file)")
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


def history_items(cfg: RunConfig, user: User) -> list[dict]:
    """The history a user's personal stage (and the history baselines) use: its latest max_history items."""
    return latest(user.profile, cfg.max_history)


def prepare(cfg: RunConfig, run_dir: str | None = None) -> Experiment:
    """Settings checked, test data loaded (user_others.json is only fingerprinted here), run dir decided."""
    cfg = cfg.resolved()
    td = load_task_data(ensure_data(cfg), cfg.task_name)
    if cfg.max_users > 0:
        td.test_users = td.test_users[: cfg.max_users]
    builder = PromptBuilder(td.task, cfg.prompts_file or None, cfg.max_field_words, bool(cfg.query_cue))
    if cfg.holdout > 0:
        td = holdout_split(td, builder, cfg.holdout)
    tpl = hashlib.sha256(json.dumps(builder.tpl, sort_keys=True).encode()).hexdigest()[:16]
    fps = {"stage1_data": data_fingerprint([td.others_path]) + tpl, "test_data": tpl}
    if cfg.allow_overlap == 2:  # stage 1 then trains on user_others.json less what matches these test queries
        check = _overlap_check(td, builder, cfg)
        td.test_users = check.tests(td.test_users)
        if check.count:
            _warn_once("\n".join(check.message(2)))
        empty = [u.user_id for u in td.test_users if not u.profile]
        if empty:
            raise DataError([f"{_test_path(td, cfg)}: test user {u!r} has no history item left once those that "
                             f"overlap its queries are left out (--allow_overlap 2)" for u in empty[:10]])
        fps["stage1_data"] += check.identity()
    run_dir = run_dir or os.path.join(cfg.output_dir, cfg.task_name, cfg.run_dir_name or cfg.default_run_dir())
    return Experiment(cfg, td, builder, run_dir, fps)


def _test_path(td: TaskData, cfg: RunConfig) -> str:
    return os.path.join(td.data_dir, cfg.task_name, "user_top_100_history.json")


def _overlap_check(td: TaskData, builder: PromptBuilder, cfg: RunConfig) -> OverlapCheck:
    return OverlapCheck(td.test_users, builder, td.others_path, _test_path(td, cfg))


def scan_training_data(exp: Experiment, collect: bool, by_user: dict[str, list[Example]] | None = None) -> list[Example]:
    """One streaming pass over user_others.json: validated, checked to share no user, query id or query text with
    the test users (whose own histories are checked too), and, when `collect`, turned into stage-1 examples. `by_user`
    (filled when given) receives every stage-1 user's examples, uncapped: what the shift generator learns from, so it
    passes the same check as stage 1."""
    mode = exp.cfg.allow_overlap
    check = _overlap_check(exp.data, exp.builder, exp.cfg)
    per_user = []
    for u in exp.data.iter_others():
        kept = check.other(u)
        trains = kept if mode == 2 else u  # None: under mode 2, an other user that is a test user
        if (collect or by_user is not None) and trains:
            per_user.append(exp.builder.user_examples(trains, include_gold_queries=True))
            if by_user is not None:
                by_user[trains.user_id] = per_user[-1]
    check.tests(exp.data.test_users)  # under mode 2 prepare() left out their overlapping items already
    if check.count and not mode:
        raise DataError(check.message())
    if check.count:
        _warn_once("\n".join(check.message(mode)))
    examples = plan.even_cap(per_user, exp.cfg.max_stage1_examples)
    if collect and not examples:
        raise DataError([f"{exp.data.others_path}: no stage-1 examples (no history items nor queries with gold)"])
    return examples


def open_model(exp: Experiment, backbone: Backbone | None = None) -> PerFitModel:
    c = exp.cfg
    gpu = dist.local_rank() if dist.enabled() else c.cuda_device  # under torchrun: one GPU per local rank
    backbone = backbone or load_backbone(c.model_path, c.dtype, gpu, c.model_name)
    return PerFitModel(c, backbone, exp.run_dir, exp.fingerprints)


def _sibling_checkpoints(exp: Experiment) -> list[str]:
    """Stage-1 checkpoints of the other runs of this task (one may have the same stage-1 settings and data)."""
    here = os.path.abspath(os.path.join(exp.run_dir, CKPT))
    found = glob.glob(os.path.join(os.path.dirname(os.path.abspath(exp.run_dir)), "*", CKPT, CKPT_TENSORS))
    dirs = {os.path.realpath(os.path.dirname(p)) for p in found}  # `latest` is a link to one of them
    return sorted(d for d in dirs if d != os.path.realpath(here))


# ---------------------------------------------------------------- the plan and the time budget

PLANS = "plans"  # <output_dir>/plans/: each budget decision, so a rerun or a resume decides the same


def _workload(exp: Experiment, pm: PerFitModel) -> tuple[plan.Workload, list[Example]]:
    """The run's data in tokens (one checked scan of user_others.json) and the stage-1 examples."""
    by_user: dict[str, list[Example]] = {}
    scan_training_data(exp, collect=False, by_user=by_user)
    lengths = lambda exs: [(e.prompt_len, len(e.ids) - e.prompt_len) for e in tokenize_examples(pm.tok, exs, exp.cfg.max_length)]  # noqa: E731
    stored = set()
    if dist.is_main() and os.path.isfile(store_path(exp.run_dir)):
        try:
            stored = {u.user_id for u in exp.data.test_users if pm.is_current(u.user_id, u.profile)}
        except RunStateError:
            stored = set()  # made with other settings: everything is retrained (or the run stops, as without a plan)
    tests = [[exp.builder.history_example(it, u.user_id) for it in u.profile] for u in exp.data.test_users
             if u.user_id not in stored]
    key1 = pm.keys()["stage1"]
    ckpts = [exp.run_dir] + [os.path.dirname(os.path.dirname(c)) for c in _sibling_checkpoints(exp)]
    reused1 = any(artifact_key(os.path.join(d, CKPT, CKPT_TENSORS), "stage1_key") == key1 for d in ckpts)
    keyg = pm.keys()["generator"]
    reusedg = any(artifact_key(os.path.join(d, GENERATOR), "generator_key") == keyg for d in ckpts)
    elem = next(pm.model.parameters()).element_size()
    s1, s2 = [lengths(v) for v in by_user.values()], [lengths(t) for t in tests]
    prefix_bytes = 0
    # last positions only: the frozen prefix is cached as keys and values (as training decides it: caches.py)
    if pm.first == 0 and can_splice(pm.model, frozen_prefix_columns([x for u in s1 + s2 for x in u], pm.last)):
        kvh, hd = kv_shape(pm.model)
        prefix_bytes = (pm.info.num_layers - min(pm.cfg.layers)) * 2 * kvh * hd * elem
    w = plan.Workload(s1, s2,
                      sum(len(u.query) for u in exp.data.test_users), reused1, reusedg, pm.info.hidden_size * elem,
                      prefix_bytes, pm.last)
    return w, [e for v in by_user.values() for e in v]


def _memory_limit(pm: PerFitModel) -> int:
    if pm.device.type == "cuda":
        import torch

        return int(plan.MEMORY_SHARE * torch.cuda.get_device_properties(pm.device).total_memory)
    import psutil

    return int(plan.MEMORY_SHARE * (psutil.virtual_memory().available + psutil.Process().memory_info().rss))


BUSY_CORES = 0.5  # other processes' load during the timed pass above which the plan says its estimate runs high


def plan_run(exp: Experiment, pm: PerFitModel) -> tuple[Experiment, PerFitModel]:
    """Before any work: the run's plan (each stage's examples, tokens, steps, estimated time and peak memory, from a
    timed pass over a few of its own examples), printed; speed settings shrunk to fit the memory; and what does not
    fit --time_budget cut in plan.CUTS order, each cut logged. The decision is kept (<output_dir>/plans/), so
    the same command run again, or resumed after a kill, makes the same cuts. Returns the (maybe cut) experiment and
    its model. Under torchrun rank 0 plans and every rank applies its decision."""
    c = exp.cfg
    budget = parse_budget(c.time_budget, pm.device.type == "cuda")
    decision = None
    if dist.is_main():
        path = os.path.join(c.output_dir, PLANS,
                            f"{c.task_name}_{pm.keys()['users']}_{'none' if budget is None else int(budget)}.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                decision = json.load(f)
            log.info("plan: as decided when this run was first planned (%s); delete that file to plan again", path)
        else:
            t0 = time.perf_counter()
            w, s1 = _workload(exp, pm)
            sample = s1 if not w.stage1_reused and s1 else [
                exp.builder.history_example(it, u.user_id) for u in exp.data.test_users for it in u.profile]
            # a short pass: a few examples and 8 queries at the quantiles of their length
            sample = plan.quantile_sample(sample, SAMPLE_EXAMPLES, lambda e: len(e.prompt))
            inputs = plan.quantile_sample(exp.queries[2], min(8, c.eval_batch_size), len)
            rates = pm.measure_cost(sample, inputs) if sample else None
            if rates is not None and rates.others_cpu > BUSY_CORES:
                log.warning("plan: other processes kept %.1f cores busy while the run's cost was measured, so the estimate "
                            "runs high and the budget may cut more than it needs; delete %s and run again on a quiet "
                            "machine to plan again", rates.others_cpu, path)
            decision = {"budget_s": budget, "device": str(pm.device), "changes": {}, "cuts": [], "memory": []}
            spent = time.perf_counter() - exp.started
            decision["spent_before_stages_s"] = round(spent, 1)
            if rates is not None:
                rc = pm.cfg
                limit = _memory_limit(pm)
                cut, cuts = plan.fit_budget(rc, w, rates, None if budget is None else max(budget - spent, 0.0), limit)
                rc2 = plan.fit_memory(rc, w, rates, limit)[0]  # the uncut run, for the record
                rc3, memory = plan.fit_memory(cut, w, rates, limit)
                knobs = [k for k, _ in plan.CUTS] + list(plan.MEMORY_SETTINGS)
                changes = {k: getattr(rc3, k) for k in knobs if getattr(rc3, k) != getattr(rc, k)}
                planned = plan.stages(rc3, w, rates)
                decision |= {"changes": changes, "cuts": cuts, "memory": memory, "rates": rates.as_dict(),
                             "before_cuts": plan.stages(rc2, w, rates), "stages": planned,
                             "estimate_s": round(plan.total_seconds(planned), 1),
                             "planning_s": round(time.perf_counter() - t0, 1)}
            write_json_atomic(path, decision)
        spent = decision.get("spent_before_stages_s", 0.0)  # as decided (a replayed decision keeps its own)
        if decision.get("stages"):
            log.info("%s", plan.describe(decision["stages"], budget, decision["device"], spent))
        for m in decision.get("memory", []):
            log.warning("plan: --%s %s -> %s so %s (results do not depend on it)", m["setting"], m["from"], m["to"],
                        m.get("why", "the peak fits this machine's memory"))
        for k in decision.get("cuts", []):
            log.warning("time budget: %s cut from %s to %s (estimate %s -> %s); to keep them: %s", k["what"], k["from"],
                        k["to"], plan.duration(k["estimate_before_s"]), plan.duration(k["estimate_after_s"]), k["lift"])
        if budget is not None and decision.get("estimate_s", 0) + spent > budget:
            log.warning("time budget: the run is estimated at %s even with every cut at its floor (%s of it loading and "
                        "planning), over the budget of %s", plan.duration(decision["estimate_s"] + spent),
                        plan.duration(spent), plan.duration(budget))
    decision = dist.broadcast(decision)
    exp.plan = decision
    if not decision["changes"]:
        return exp, pm
    exp2 = prepare(dataclasses.replace(c, **decision["changes"]))
    exp2.plan = decision
    pm2 = PerFitModel(exp2.cfg, Backbone(pm.model, pm.tok, pm.info), exp2.run_dir, exp2.fingerprints)
    return exp2, pm2


def _share_stage1(pm: PerFitModel) -> None:
    """Under torchrun: rank 0's stage-1 shifts (if it has them) on every rank. A single process has nothing to share."""
    if not dist.enabled():
        return
    found = (save(pm.collective.state_dict()), pm.stage1_meta) if dist.is_main() and pm.collective is not None else None
    found = dist.broadcast(found)
    if found is not None and pm.collective is None:
        pm.set_collective(load_collective_from(found[1], load(found[0]))[0], found[1])


def ensure_stage1(exp: Experiment, pm: PerFitModel) -> None:
    """Reuse this run's stage-1 checkpoint, or another run's with the same stage-1 key, or train it. Also checks the
    data (streams user_others.json once) before anything is trained. Under torchrun rank 0 decides and hands the
    reused checkpoint to the other ranks."""
    if dist.is_main():
        if pm.load_collective_if_current(bool(exp.cfg.overwrite)):
            log.info("stage 1: reusing checkpoint %s (same stage-1 settings and data)", os.path.join(exp.run_dir, CKPT))
        else:
            for ckpt in _sibling_checkpoints(exp):
                if pm.adopt_collective(ckpt):
                    log.info("stage 1: reusing the checkpoint of %s (same stage-1 settings and data)", ckpt)
                    break
    _share_stage1(pm)
    reused = pm.collective is not None
    examples = scan_training_data(exp, collect=not reused)
    if not reused:
        pm.fit_collective(examples, fresh=bool(exp.cfg.overwrite))
    exp.timings["stage1_train_seconds"] = pm.stage1_meta.get("train_seconds", 0.0)
    if dist.is_main():
        pm.save_config()


def ensure_generator(exp: Experiment, pm: PerFitModel) -> None:
    """This run's shift generator: reused (this run's, or a sibling's with the same generator key) or learned from the
    stage-1 users' examples (the same checked scan of user_others.json as stage 1). Under torchrun rank 0 learns it
    and the other ranks load it."""
    if pm.load_generator_if_current():
        log.info("shift generator: reusing %s", os.path.join(exp.run_dir, GENERATOR))
    elif dist.is_main():
        for ckpt in _sibling_checkpoints(exp):
            if pm.adopt_generator(os.path.join(os.path.dirname(os.path.dirname(ckpt)), GENERATOR)):
                log.info("shift generator: reusing the one of %s (same stage 1 and generator settings)", ckpt)
                break
        else:
            by_user: dict[str, list[Example]] = {}
            scan_training_data(exp, collect=False, by_user=by_user)
            if len(by_user) < 100:
                _warn_once(f"shift generator: only {len(by_user)} stage-1 users to learn from; a generator needs many "
                           f"(100 or more) to map a history to a shift")
            pm.fit_generator(by_user)
    dist.barrier()
    if pm.generator is None and not pm.load_generator_if_current():
        raise RunStateError(f"{exp.run_dir}: rank {dist.rank()} found no shift generator after rank 0 made it")
    exp.timings["generator_train_seconds"] = pm.generator_meta.get("report", {}).get("train_seconds", 0.0)


def ensure_users(exp: Experiment, pm: PerFitModel, label: str = "stage 2") -> None:
    """Personal shifts for every test user not stored yet (or stored from other history items). Under torchrun rank 0
    reads the store and says who is to train."""
    users = exp.data.test_users
    todo = None
    if dist.is_main():
        pm.open_store(bool(exp.cfg.overwrite))
        todo = [u.user_id for u in users if not pm.is_current(u.user_id, u.profile)]
        if len(todo) < len(users):
            log.info("%s: %d users already in the store, %d to train", label, len(users) - len(todo), len(todo))
    todo = set(dist.broadcast(todo))
    if todo:
        pm.personalize({u.user_id: u.profile for u in users if u.user_id in todo}, desc=label)
    dist.barrier()


def predict_variants(exp: Experiment, pm: PerFitModel, variants=VARIANTS) -> dict:
    """{variant: {query id: prediction}}, plus generation seconds per variant in exp.timings (zero_shot only with
    --zero_shot 1)."""
    variants = [v for v in variants if v != "zero_shot" or exp.cfg.zero_shot]
    qids, owners, inputs = exp.queries
    out: dict[str, dict[str, str]] = {}
    for v in variants:
        t0 = time.perf_counter()
        out[v] = dict(zip(qids, pm.generate(owners, inputs, variant=v, desc=v)))
        exp.timings[f"{v}_predict_seconds"] = time.perf_counter() - t0
    return out


def write_outputs(exp: Experiment, pm: PerFitModel, preds: dict) -> dict:
    task, golds, run, t = exp.data.task, exp.golds, exp.run_dir, exp.timings
    # stage-2 time is the stored users' own training time, so a later `predict` reports it too
    s1 = t.get("stage1_train_seconds", 0.0)
    stored = pm.store.entries()
    s2 = sum(stored.get(u.user_id, {}).get("train_seconds", 0.0) for u in exp.data.test_users)
    sh = pm.collective
    results = {"task": task.name, "run_dir": run, "model": dataclasses.asdict(pm.info), "variants": {},
               "stage1_learning": pm.stage1_meta.get("learning"), "personalize": exp.cfg.personalize,
               "generator": pm.generator_meta.get("report"), "plan": exp.plan or None,
               "wall_seconds": exp.timings.get("wall")}
    gen_s = t.get("generator_train_seconds", 0.0) if exp.cfg.personalize != "train" else 0.0
    train_s = {"zero_shot": 0.0, "stage1": s1, "perfit": s1 + gen_s + s2}
    for v, p in preds.items():
        results["variants"][v] = {
            "metrics": metrics.evaluate(task, golds, p), "queries": len(p),
            "trainable_parameters": {"collective": 0 if v == "zero_shot" else sh.collective_parameters() + sh.personal_parameters(),
                                     "per_user": sh.personal_parameters() if v == "perfit" else 0},
            "train_seconds": round(train_s[v], 2), "predict_seconds": round(t.get(f"{v}_predict_seconds", 0.0), 2),
            "wall_seconds": round(train_s[v] + t.get(f"{v}_predict_seconds", 0.0), 2),
        }
    results["notes"] = ("stage1 = collective shift + the initial personal module P0 shared by all users (no per-user "
                        "training); perfit = collective + each user's own shift; stage-2 train_seconds covers all "
                        f"{len(exp.data.test_users)} users.")
    pdir = os.path.join(run, f"perfit_data_type={DATA_TYPE}")
    write_json_atomic(os.path.join(pdir, "predictions.json"), metrics.preds_document(task, preds["perfit"]))
    for v in preds:
        if v != "perfit":
            write_json_atomic(os.path.join(pdir, f"predictions_{v}.json"), metrics.preds_document(task, preds[v]))
    per_user = [{"user_id": u.user_id,
                 "query": [{"id": q.id, "gold": golds[q.id], **{v: preds[v][q.id] for v in preds}} for q in u.query]}
                for u in exp.data.test_users]
    write_json_atomic(os.path.join(run, f"result_data_type={DATA_TYPE}", f"{DATA_TYPE}_all.json"), per_user)
    write_json_atomic(os.path.join(run, "results.json"), results)
    return results


def summary_table(results: dict) -> str:
    from .tasks import get_task

    first = next(iter(results["variants"].values()))
    keys = metrics.report_keys(get_task(results["task"]))
    line = (f"{results['task']}: " + " | ".join(f"{v} " + "/".join(f"{r['metrics'][k]:.3f}" for k in keys)
                                                for v, r in results["variants"].items())
            + f"  ({'/'.join(keys)}, n={first['queries']})")
    learning = results.get("stage1_learning") or {}
    return line + (f"\nwarning: {learning['message']}" if learning.get("message") else "")


def link_latest(run_dir: str) -> None:
    """<output_dir>/<task>/latest points at the run dir that finished last (replaced in one rename)."""
    parent, name = os.path.split(os.path.abspath(run_dir))
    tmp = os.path.join(parent, f".latest-{os.getpid()}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, os.path.join(parent, "latest"))


def run(cfg: RunConfig, backbone: Backbone | None = None) -> dict | None:
    """The whole pipeline. Under torchrun every rank trains and rank 0 predicts and writes the outputs (the other
    ranks return None)."""
    exp = prepare(cfg)
    exp, pm = plan_run(exp, open_model(exp, backbone))
    with _timed(exp, "stage 1"):
        ensure_stage1(exp, pm)
    if exp.cfg.generator:
        with _timed(exp, "shift generator"):
            ensure_generator(exp, pm)
    with _timed(exp, "stage 2"):
        ensure_users(exp, pm)
    if not dist.is_main():
        return None
    with _timed(exp, "predictions"):
        preds = predict_variants(exp, pm)
    res = write_outputs(exp, pm, preds)
    link_latest(exp.run_dir)
    return res


@contextlib.contextmanager
def _timed(exp: Experiment, stage: str):
    """The wall time of one stage of this run (reuse included), beside the plan's estimate in results.json."""
    t0 = time.perf_counter()
    yield
    exp.timings.setdefault("wall", {})[stage] = round(time.perf_counter() - t0, 1)


def stage1_only(cfg: RunConfig, backbone: Backbone | None = None) -> str:
    exp = prepare(cfg)
    exp, pm = plan_run(exp, open_model(exp, backbone))
    ensure_stage1(exp, pm)
    if exp.cfg.generator:
        ensure_generator(exp, pm)
    return os.path.join(exp.run_dir, CKPT)


def _require_stage1(exp: Experiment, pm: PerFitModel) -> None:
    if not pm.load_collective_if_current():
        raise RunStateError(f"{os.path.join(exp.run_dir, CKPT)}: no stage-1 checkpoint for these settings; run "
                            f"`perfit stage1` with the same settings first")
    exp.timings["stage1_train_seconds"] = pm.stage1_meta.get("train_seconds", 0.0)


def stage2_only(cfg: RunConfig, backbone: Backbone | None = None) -> str:
    exp = prepare(cfg)
    exp, pm = plan_run(exp, open_model(exp, backbone))
    if dist.is_main():
        _require_stage1(exp, pm)
    _share_stage1(pm)
    scan_training_data(exp, collect=False)
    if exp.cfg.generator:
        ensure_generator(exp, pm)
    ensure_users(exp, pm)
    return os.path.join(exp.run_dir, USERS)


def predict_only(cfg: RunConfig | None = None, run_dir: str | None = None, backbone: Backbone | None = None,
                 overrides: dict | None = None) -> dict:
    """Predictions and metrics from a run's stored stage-1 checkpoint and users. With `run_dir`, the settings come
    from the run's config, `overrides` changing those that can change on a finished run (RUN_OVERRIDES: dtype, device,
    batch size, users, data; any other is refused); user_others.json is never read."""
    if run_dir:
        base = load_run_config(run_dir)
        cfg = dataclasses.replace(base, **check_run_overrides(base, overrides or {}, run_dir))
    exp = prepare(cfg, run_dir)
    if backbone is None and run_dir:
        pm = PerFitModel.from_run(run_dir, overrides=overrides)
    else:
        pm = open_model(exp, backbone)
        _require_stage1(exp, pm)
    exp.timings["stage1_train_seconds"] = pm.stage1_meta.get("train_seconds", 0.0)
    stale = [u.user_id for u in exp.data.test_users if not pm.is_current(u.user_id, u.profile)]
    if stale:
        raise RunStateError(f"{pm.store.path}: no personal shift trained on the current history for users {stale[:10]}; "
                            f"run `perfit stage2` first")
    return write_outputs(exp, pm, predict_variants(exp, pm))
