"""`perfit compare`: PerFit against its peers on the same model, data, users and queries, one table.

Every method runs in its own process by default (its peak memory is then its own and no method can leave the
model changed for the next), writes `<output_dir>/methods/<method>.json` atomically, and is skipped on a rerun
whose settings would not change it (the record's key is derived from the settings' declared effects). PerFit's
methods (baselines/methods.py) run through `PerFitModel`; the peers' trained parts (task LoRA, OPPU's per-user LoRAs)
are stored under `<output_dir>/<task>/baselines/`, keyed the same way, so changing a shift setting never retrains
them. The report (report.py) is `comparison.json`, `comparison.md` and `comparison.png`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

from . import pipeline
from .baselines.methods import run_method
from .config import METHODS, CompareConfig, from_dict, to_dict
from .data import write_json_atomic
from .errors import PerFitError, user_message
from .report import write_report

log = logging.getLogger("perfit")


def _fingerprints(cfg: CompareConfig) -> dict:
    return pipeline.prepare(cfg).fingerprints


# ---------------------------------------------------------------- orchestration

PLANNED = {"stage1", "perfit", "perfit_instant", "perfit_warm"}  # the methods PerFit's plan and budget speak for


def plan_methods(cfg: CompareConfig, exp: pipeline.Experiment) -> tuple[CompareConfig, pipeline.Experiment]:
    """PerFit's plan, printed before any method runs (compare) or trial (tune: for the base settings); under an
    explicit --time_budget (auto means none here: the other methods and the trials are not planned) its cuts apply
    to every method and trial, so all are scored on the same data."""
    import dataclasses

    if cfg.time_budget.strip().lower() == "auto":
        cfg = dataclasses.replace(cfg, time_budget="none")
    exp, pm = pipeline.plan_run(dataclasses.replace(exp, cfg=cfg), pipeline.open_model(exp))
    del pm
    changes = exp.plan.get("changes", {})
    if not changes:
        return cfg, exp
    cfg = dataclasses.replace(cfg, **changes)
    return cfg, pipeline.prepare(cfg)

def _method_path(out: str, method: str) -> str:
    return os.path.join(out, "methods", f"{method}.json")


def compare(cfg: CompareConfig) -> dict:
    cfg = cfg.resolved()
    methods = cfg.method_list()
    exp = pipeline.prepare(cfg)
    if PLANNED & set(methods):
        cfg, exp = plan_methods(cfg, exp)
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
