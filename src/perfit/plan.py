"""A run's plan before any work: what each stage will do (examples, tokens, steps), how long it will take on this
device and the memory it will need, from rates measured on a few of the run's own examples (`train.cost`); and the
time budget: what does not fit is cut in one documented order (CUTS), each cut named with how to lift it.

The estimate is linear in tokens: training costs (once + epochs x per-epoch) seconds per token, a forward pass
(generator features, validation) its own rate, predictions a rate per query. docs/performance.md says how close
it came on the runs made.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, TypeVar

from .train.cost import Rates
from .train.stages import PROBE_EXAMPLES

T = TypeVar("T")
MEMORY_SHARE = 0.85  # of the memory the process can use (free + its own) that a stage may plan to take

# the order in which a run that does not fit is cut, each down to its floor: the zero_shot answers first (PerFit's
# own rows do not use them), then stage-1 examples (the collective shift is a few thousand parameters learned from
# many users), then the oldest history, then stage-2 epochs, and stage-1 epochs last: with a cached prefix an epoch
# costs a few % of reading the examples once, so cutting them saves little, and a larger model's collective shift
# needs them (Gemma 3 270M: one stage-1 epoch left it at 0.097 accuracy). docs/performance.md#the-plan-and-the-time-budget.
CUTS: tuple[tuple[str, str], ...] = (
    ("zero_shot", "the zero_shot answers (the bare model's row)"),
    ("max_stage1_examples", "stage-1 examples, taken evenly across the stage-1 users"),
    ("max_history", "history items per test user, latest kept"),
    ("max_epoch", "stage-2 epochs"),
    ("stage1_epochs", "stage-1 epochs"),
)
MEMORY_SETTINGS = ("rows_per_pass", "cache_max_bytes")  # what fit_memory may change (speed only)
FLOORS = {"zero_shot": 0, "max_stage1_examples": 256, "stage1_epochs": 1, "max_history": 8, "max_epoch": 2}


def even_cap(per_user: list[list[T]], n: int) -> list[T]:
    """At most n items, taken round-robin across users so every user is represented (0: all)."""
    if n <= 0:
        return [e for u in per_user for e in u]
    out: list[T] = []
    k = 0
    while len(out) < n and any(k < len(u) for u in per_user):
        out += [u[k] for u in per_user if k < len(u)][: n - len(out)]
        k += 1
    return out


def quantile_sample(items: list[T], n: int, key) -> list[T]:
    """n items at the quantiles of `key` (the middle of each n-th): the timed pass's examples and queries."""
    items = sorted(items, key=key)
    n = min(n, len(items))
    return [items[(2 * k + 1) * len(items) // (2 * n)] for k in range(n)] if n else []


def duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class Workload:
    """The run's data in tokens: (prompt, target) tokens of every example, per user."""
    stage1: list[list[tuple[int, int]]]  # each stage-1 user's examples (user_others.json, as stage 1 scans it)
    tests: list[list[tuple[int, int]]]  # each test user to personalize: its history examples, oldest first
    queries: int
    stage1_reused: bool = False  # a checkpoint with this stage-1 key exists (here or in a sibling run)
    generator_reused: bool = False
    state_bytes_per_token: int = 0  # hidden size x element size: one cached frozen state
    # last-positions-only shifts: each prompt token before the last `last` is cached as keys and values of every layer
    # from the lowest shifted one up (this many bytes a token; 0: the run caches only the states entering that layer)
    prefix_bytes_per_token: int = 0
    last: int = 0


def cache_need(w: Workload, rows: list[tuple[int, int]]) -> int:
    """Bytes of the frozen states training caches for these examples (caches.compute_frozen_prefix / lower cache)."""
    if not w.prefix_bytes_per_token:
        return _tokens(rows) * w.state_bytes_per_token
    total = 0
    for p, t in rows:
        prefix = max(p - max(w.last, 1), 0)
        total += prefix * w.prefix_bytes_per_token + (p + t - prefix) * w.state_bytes_per_token
    return total


def _tokens(rows: list[tuple[int, int]]) -> int:
    return sum(p + t for p, t in rows)


def _mean(rows: list[tuple[int, int]], k: int) -> float:
    return round(sum(r[k] for r in rows) / len(rows), 1) if rows else 0.0


def _steps(per_user: list[int], epochs: int, batch: int, group: int) -> int:
    """Steps of the batched loop: users in groups of `group`, a group as many steps as its longest user."""
    sizes = [math.ceil(n / batch) * epochs for n in per_user]
    return sum(max(sizes[g: g + group], default=0) for g in range(0, len(sizes), group))


def _passes(n: int, batch: int, rows: int) -> int:
    """Training passes an epoch over n examples, `batch` a step, at most `rows` rows a pass."""
    return math.ceil(n / batch) * math.ceil(batch / max(rows, batch)) if n else 0


def stages(cfg, w: Workload, r: Rates) -> list[dict]:
    """Each stage's plan under `cfg` (resolved): examples, mean prompt/target tokens, epochs, steps, seconds, peak bytes."""
    out = []

    def rates(rows) -> tuple[float, float, int, bool]:
        """(once, per-epoch seconds a token, cached bytes, whether the frozen prefix is cached): a frozen prefix over
        the cache bound is not kept, and every epoch then runs whole prompts (about a forward and its backward)."""
        need = cache_need(w, rows)
        if w.prefix_bytes_per_token and need > cfg.cache_max_bytes:
            return 0.0, 3 * r.forward_token_s, min(_tokens(rows) * w.state_bytes_per_token, cfg.cache_max_bytes), False
        return r.train_token_once_s, r.train_token_epoch_s, min(need, cfg.cache_max_bytes), True

    passes = lambda rows, ex: r.pass_bytes_per_row_token * rows * max((p + t for p, t in ex), default=0)  # noqa: E731
    s1 = even_cap(w.stage1, cfg.max_stage1_examples)
    tok1 = _tokens(s1)
    once1, epoch1, cache1, fits1 = rates(s1)
    out.append({"stage": "stage 1", "reused": w.stage1_reused, "examples": len(s1), "prompt_tokens": _mean(s1, 0),
                "target_tokens": _mean(s1, 1), "epochs": cfg.stage1_epochs,
                "steps": 0 if w.stage1_reused else _steps([len(s1)], cfg.stage1_epochs, cfg.batch_size, 1),
                "seconds": 0.0 if w.stage1_reused else tok1 * (once1 + cfg.stage1_epochs * epoch1)
                + cfg.stage1_epochs * _passes(len(s1), cfg.batch_size, cfg.rows_per_pass) * r.train_pass_s
                + 2 * _tokens(s1[:: max(1, len(s1) // PROBE_EXAMPLES)][:PROBE_EXAMPLES]) * r.forward_token_s,  # the learning probe
                "cache_bytes": 0 if w.stage1_reused else cache1, "cache_need": cache_need(w, s1), "cached": fits1,
                "rows": cfg.batch_size,
                "pass_bytes": 0 if w.stage1_reused else passes(cfg.batch_size, s1)})
    if cfg.generator:
        every = [e for u in w.stage1 for e in u]
        users = [u for u in w.stage1 if len(u) > 1]
        per = _tokens(every) / max(len(every), 1)
        train = cfg.gen_epochs * len(users) * cfg.gen_targets * per * (r.train_token_epoch_s + r.forward_token_s)
        out.append({"stage": "shift generator", "reused": w.generator_reused, "examples": len(every),
                    "prompt_tokens": _mean(every, 0), "target_tokens": _mean(every, 1), "epochs": cfg.gen_epochs,
                    "steps": 0 if w.generator_reused else cfg.gen_epochs * math.ceil(len(users) / cfg.gen_users_per_step),
                    "seconds": 0.0 if w.generator_reused else _tokens(every) * r.forward_token_s + train,
                    "cache_bytes": 0 if w.generator_reused else min(_tokens(every) * w.state_bytes_per_token,
                                                                    cfg.cache_max_bytes), "rows": 0, "pass_bytes": 0})
    hist = [u[-cfg.max_history:] if cfg.max_history > 0 else u for u in w.tests]
    ex2 = [e for u in hist for e in u]
    tok2 = _tokens(ex2)
    mode = cfg.personalize
    epochs = 0 if mode == "instant" else cfg.warm_epochs if mode == "instant+train" else cfg.max_epoch
    secs = tok2 * r.forward_token_s if mode != "train" else 0.0
    group = min(cfg.user_group_size, max(len(hist), 1))
    groups = [[e for u in hist[g: g + group] for e in u] for g in range(0, len(hist), group)]
    biggest = max(groups, key=lambda rows: cache_need(w, rows), default=[])
    once2, epoch2, cache2, fits2 = rates(biggest)
    if epochs:
        secs += sum(_tokens(rows) * (rates(rows)[0] + epochs * rates(rows)[1]) for rows in groups)
        secs += epochs * r.train_pass_s * sum(max(_passes(len(u), cfg.batch_size, cfg.rows_per_pass) for u in users)
                                              * math.ceil(len(users) * cfg.batch_size / cfg.rows_per_pass)
                                              for users in (hist[g: g + group] for g in range(0, len(hist), group)))
        if cfg.early_stopping > 0:  # each user's validation items are scored once per epoch
            secs += sum(_tokens(u[-cfg.early_stopping:]) for u in hist) * epochs * r.forward_token_s
    rows = min(cfg.rows_per_pass, group * cfg.batch_size)
    out.append({"stage": "stage 2", "users": len(hist), "examples": len(ex2), "prompt_tokens": _mean(ex2, 0),
                "target_tokens": _mean(ex2, 1), "epochs": epochs, "mode": mode,
                "steps": _steps([len(u) for u in hist], epochs, cfg.batch_size, cfg.user_group_size),
                "seconds": secs, "cache_bytes": cache2, "cache_need": cache_need(w, biggest), "cached": fits2, "rows": rows, "pass_bytes": passes(rows, ex2) if epochs else 0})
    variants = 2 + cfg.zero_shot
    out.append({"stage": "predictions", "queries": w.queries, "variants": variants,
                "seconds": variants * (w.queries * r.generate_query_s
                                       + math.ceil(w.queries / cfg.eval_batch_size) * r.generate_batch_s),
                "cache_bytes": 0, "rows": 0, "pass_bytes": 0})
    for s in out:
        s["seconds"] = round(s["seconds"], 1)
        s["cache_bytes"], s["pass_bytes"] = int(s["cache_bytes"]), int(s["pass_bytes"])
        reused = s.get("reused") or (s["stage"] == "stage 1" and w.stage1_reused)
        s["peak_bytes"] = 0 if reused else int(r.base_bytes + s["cache_bytes"] + s["pass_bytes"])
    return out


def total_seconds(plan: list[dict]) -> float:
    return sum(s["seconds"] for s in plan)


def fit_budget(cfg, w: Workload, r: Rates, budget: float | None, memory: int | None = None) -> tuple[object, list[dict]]:
    """`cfg` cut in CUTS order until the estimate fits `budget` seconds (unchanged when it fits already); each knob
    takes the largest value that fits, never below its floor. Each candidate is estimated with its speed settings
    fitted to `memory` bytes (`fit_memory`: a smaller run may keep its frozen prefix cached). Returns (cfg, cuts)."""
    est: Callable[[object], float] = lambda c: total_seconds(stages(fit_memory(c, w, r, memory)[0], w, r))  # noqa: E731
    cuts: list[dict] = []
    cfg0 = cfg
    if budget is None or est(cfg) <= budget:
        return cfg, cuts
    for knob, what in CUTS:
        if knob in ("max_stage1_examples", "stage1_epochs") and w.stage1_reused:
            continue  # stage 1 is done: cutting it would only retrain it
        if knob == "max_epoch" and cfg.personalize == "instant":
            continue
        now = _current(cfg, knob, w)
        floor = min(FLOORS[knob], now)
        if now <= floor:
            continue
        lo, hi, best = floor, now - 1, floor  # the largest value in [floor, now) that fits; floor if none
        while lo <= hi:
            mid = (lo + hi) // 2
            if est(dataclasses.replace(cfg, **{knob: mid})) <= budget:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        before = est(cfg)
        cfg = dataclasses.replace(cfg, **{knob: best})
        cuts.append({"setting": knob, "what": what, "from": now, "to": best,
                     "estimate_before_s": round(before, 1), "estimate_after_s": round(est(cfg), 1),
                     "lift": f"--{knob} {getattr(cfg0, knob)} with --time_budget none (or a larger --time_budget)"})
        if est(cfg) <= budget:
            break
    return cfg, cuts


def _current(cfg, knob: str, w: Workload) -> int:
    """The knob's effective value (0 means 'all' for the caps)."""
    v = getattr(cfg, knob)
    if knob == "max_stage1_examples":
        return v if v > 0 else sum(len(u) for u in w.stage1)
    if knob == "max_history":
        return v if v > 0 else max((len(u) for u in w.tests), default=0)
    return v


def fit_memory(cfg, w: Workload, r: Rates, limit: int | None) -> tuple[object, list[dict]]:
    """Speed settings shrunk (rows per training pass, then the in-memory state cache, which then spills to disk) so
    that no stage's peak exceeds `limit` bytes; results do not depend on them. Returns (cfg, changes)."""
    changes: list[dict] = []
    if not limit:
        return cfg, changes
    peak = lambda c: max(stages(c, w, r), key=lambda s: s["peak_bytes"])  # noqa: E731
    over = [s for s in stages(cfg, w, r) if s.get("cached") is False]
    if over:  # a frozen prefix over the bound would be recomputed every epoch: raise the bound if memory allows
        raised = dataclasses.replace(cfg, cache_max_bytes=max(s["cache_need"] for s in over))
        if peak(raised)["peak_bytes"] <= limit:
            changes.append({"setting": "cache_max_bytes", "from": cfg.cache_max_bytes, "to": raised.cache_max_bytes,
                            "why": "the frozen prefix stays cached (over the bound it is recomputed every epoch)"})
            cfg = raised
    top = peak(cfg)
    if top["peak_bytes"] > limit and top["stage"] == "stage 2" and cfg.rows_per_pass > cfg.batch_size:
        per_row = max(top["pass_bytes"] / top["rows"], 1)
        rows = max(cfg.batch_size, int((limit - top["peak_bytes"] + top["pass_bytes"]) // per_row))
        if rows < cfg.rows_per_pass:
            changes.append({"setting": "rows_per_pass", "from": cfg.rows_per_pass, "to": rows})
            cfg = dataclasses.replace(cfg, rows_per_pass=rows)
    top = peak(cfg)
    if top["peak_bytes"] > limit and top["cache_bytes"] > 0:
        new = max(0, int(top["cache_bytes"] - (top["peak_bytes"] - limit)))
        changes.append({"setting": "cache_max_bytes", "from": cfg.cache_max_bytes, "to": new})
        cfg = dataclasses.replace(cfg, cache_max_bytes=new)
    return cfg, changes


def describe(plan: list[dict], budget: float | None, device: str, spent: float = 0.0) -> str:
    """The plan as the log prints it; `spent`: seconds the command took before its stages (loading, planning)."""
    lines = [f"plan on {device} (estimated from a timed pass over the run's own examples):"]
    for s in plan:
        if s.get("reused") or s.get("users") == 0:
            lines.append(f"  {s['stage']}: {'reused' if s.get('reused') else 'every user already stored'}")
            continue
        if s["stage"] == "predictions":
            what = f"{s['queries']} queries x {s['variants']} variants"
        else:
            who = f"{s['users']} users, " if "users" in s else ""
            what = (f"{who}{s['examples']} examples "
                    f"(mean {s['prompt_tokens']:.0f} prompt + {s['target_tokens']:.0f} target tokens), "
                    f"{s['epochs']} epochs, {s['steps']} steps")
        lines.append(f"  {s['stage']}: {what}: ~{duration(s['seconds'])}, peak ~{s['peak_bytes'] / 2**30:.1f} GiB")
    t = total_seconds(plan)
    lines.append(f"  total ~{duration(t + spent)}, {duration(spent)} of it loading and planning"
                 + ("" if budget is None else f" (time budget {duration(budget)})"))
    return "\n".join(lines)
