"""`perfit tune`: a search over the settings that matter, as the paper chose its ranks, layers and positions (random or
TPE search), every trial scored on each test user's held-out last `--holdout` history items, never on test queries.

Optuna runs the search and keeps it in `<output_dir>/tune.db` (SQLite), so a killed tune resumes where it stopped
(a trial cut short counts as failed and is not repeated). A trial runs one `perfit compare` method through
`baselines.methods.run_method`; trials that differ only in stage-2 settings reuse the stage-1 checkpoint of an earlier trial.
Writes `tune.json` (every trial, with its paired difference from a reference method run once on the same held-out
items), `tune.png` (the score against each setting) and `best_config.json` (the best settings, with holdout off:
`perfit compare --config best_config.json` runs them on the test queries)."""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from .config import METHODS, CompareConfig, ConfigError, _f, read_mapping, to_dict
from .errors import PerFitError
from .data import atomic_path, write_json_atomic
from .metrics import paired_difference, primary_metric
from .tasks import get_task

log = logging.getLogger("perfit")

# name -> {"type": "int" | "float" | "categorical", "low", "high", "log", "choices"}
SPACES = {
    "perfit": {
        "low_rank_dimension": {"type": "int", "low": 4, "high": 64, "log": True},
        "user_low_rank_dimension": {"type": "int", "low": 1, "high": 16, "log": True},
        "intervene_layer": {"type": "categorical", "choices": ["14;15", "14;15;16", "10;15", "8;16", "20;24"]},
        "positions": {"type": "categorical", "choices": ["f7+l7", "l7", "f3+l3", "f10+l10", "l14"]},
        "lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
        "user_lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True},
        "max_epoch": {"type": "int", "low": 2, "high": 8},
        "batch_size": {"type": "categorical", "choices": [4, 8, 16]},
        "shift_init": {"type": "categorical", "choices": ["loreft", "zero"]},
    },
    "oppu": {
        "oppu_lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "oppu_epochs": {"type": "int", "low": 2, "high": 8},
    },
}
SPACES["perfit_stage2_only"] = {k: v for k, v in SPACES["perfit"].items() if k not in ("lr",)}


@dataclass
class TuneConfig(CompareConfig):
    method: str = _f("perfit", "The method tuned (a `perfit compare` method with a search space: perfit, perfit_stage2_only, oppu).", ())
    trials: int = _f(20, "Trials in all (a resumed tune runs only the missing ones).", (), min=1)
    space: str = _f("", "JSON or YAML file of the search space ({setting: {type: int|float|categorical, low, high, log, choices}}). Empty: the method's default space.", ())
    sampler: str = _f("tpe", "Optuna sampler: tpe, random, or grid (every combination of the space once; its settings must be "
                              "categorical or int ranges).", (), choices=("tpe", "random", "grid"))
    output_dir: str = _f("tune", "Folder of tune.db, tune.json, tune.png, best_config.json and every trial's checkpoints.", ())
    reference: str = _f("", "Method run once on the same held-out items, each trial's paired difference from it in tune.json "
                            "(whether a trial beats it beyond noise). Empty: user_majority for classification, zero_shot "
                            "for generation; none: no reference.", ())


def _compare_config(tc: TuneConfig) -> CompareConfig:
    """The settings a trial runs with, without the tune's own."""
    return CompareConfig(**{f.name: getattr(tc, f.name) for f in dataclasses.fields(CompareConfig)})


def search_space(tc: TuneConfig) -> dict:
    if tc.space:
        space = read_mapping(tc.space, "--space", "settings to their ranges")
    elif tc.method in SPACES:
        space = SPACES[tc.method]
    else:
        raise ConfigError(f"--method {tc.method}: no default search space; give one with --space (methods with one: "
                          f"{', '.join(SPACES)})")
    fields = {f.name for f in dataclasses.fields(CompareConfig)}
    bad = sorted(set(space) - fields)
    if bad:
        raise ConfigError(f"--space {tc.space}: {bad} are not settings")
    for name, spec in space.items():
        if spec.get("type") not in ("int", "float", "categorical") or \
                (spec["type"] == "categorical" and not spec.get("choices")) or \
                (spec["type"] != "categorical" and not ("low" in spec and "high" in spec)):
            raise ConfigError(f"--space: {name!r} needs type int|float with low and high, or categorical with choices")
    return space


def _suggest(trial, space: dict) -> dict:
    out = {}
    for name, s in space.items():
        if s["type"] == "int":
            out[name] = trial.suggest_int(name, int(s["low"]), int(s["high"]), log=bool(s.get("log")))
        elif s["type"] == "float":
            out[name] = trial.suggest_float(name, float(s["low"]), float(s["high"]), log=bool(s.get("log")))
        else:
            out[name] = trial.suggest_categorical(name, list(s["choices"]))
    return out


def grid(space: dict) -> dict:
    """The space as Optuna's grid: categorical choices as given, int ranges expanded; a float range has no grid."""
    out = {}
    for name, s in space.items():
        if s["type"] == "float":
            raise ConfigError(f"--sampler grid: {name!r} is a float range; give it as categorical choices")
        out[name] = list(s["choices"]) if s["type"] == "categorical" else list(range(int(s["low"]), int(s["high"]) + 1))
    return out


def _sampler(tc: TuneConfig, space: dict, trials_before: int = 0):
    """A resumed study gets a seed offset by its trials so far: with the same seed a sampler draws the same
    sequence again, so a resumed random or TPE search would repeat its first trials (a grid skips visited points)."""
    import optuna

    if tc.sampler == "grid":
        return optuna.samplers.GridSampler(grid(space), seed=tc.seed)
    if tc.sampler == "random":
        return optuna.samplers.RandomSampler(seed=tc.seed + trials_before)
    return optuna.samplers.TPESampler(seed=tc.seed + trials_before)


def tune(tc: TuneConfig) -> dict:
    from .extras import require

    require("tune", "perfit tune")
    import optuna

    from . import pipeline
    from .baselines.methods import run_method
    from .compare import PLANNED, plan_methods, save_record, saved_record

    if tc.holdout <= 0:
        raise ConfigError("--holdout must be > 0: trials are scored on each test user's held-out last history items, "
                          "never on the test queries")
    base = dataclasses.replace(_compare_config(tc), output_dir=os.path.join(tc.output_dir, "trials"), isolate=0,
                               reference="")
    base.resolved()
    ref = reference_method(tc)
    space = search_space(tc)
    sampler = _sampler(tc, space)  # a space the sampler cannot take is refused before anything is written
    exp = pipeline.prepare(base)  # so is a task that makes no held-out queries
    if tc.method in PLANNED:
        base, exp = plan_methods(base, exp)
    os.makedirs(tc.output_dir, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    direction = "minimize" if get_task(tc.task_name).lower_is_better else "maximize"  # MAE for ratings
    study = optuna.create_study(study_name=f"{tc.task_name}-{tc.method}", direction=direction, sampler=sampler,
                                storage=f"sqlite:///{os.path.join(tc.output_dir, 'tune.db')}", load_if_exists=True)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)  # cut short by a kill: counted as failed, not repeated
    stored = len(study.get_trials(deepcopy=False))
    if stored:
        study.sampler = _sampler(tc, space, stored)
    task = get_task(tc.task_name)
    name = primary_metric(task)
    ref_rec = None
    if ref:
        ref_rec = saved_record(base, ref, exp.fingerprints) or \
            save_record(base, ref, run_method(base, ref), exp.fingerprints)
        log.info("tune: reference %s on the held-out items: %s %.4f", ref, name, ref_rec["metrics"][name])

    def objective(trial) -> float:
        params = _suggest(trial, space)
        cfg = dataclasses.replace(base, **params)
        try:
            rec = run_method(cfg, tc.method)
        except PerFitError as e:  # settings, data or run state the user can fix: a failed trial (optuna catches it),
            # its reason kept for the error below; anything else is a bug and stops the tune with its traceback
            trial.set_user_attr("error", str(e).splitlines()[0][:500])
            raise
        m = rec["metrics"]
        trial.set_user_attr("metrics", m)
        msg = ""
        if ref_rec is not None:
            d = paired_difference(task, exp.golds, rec["predictions"], ref_rec["predictions"])
            trial.set_user_attr("vs_reference", d)
            msg = f" ({d['diff']:+.4f} ± {d['se']:.4f} against {ref}, paired)"
        log.info("tune: trial %d %s -> %s %.4f%s", trial.number, params, name, m[name], msg)
        return float(m[name])

    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if done < tc.trials:  # a grid stops by itself once every combination has run
        study.optimize(objective, n_trials=tc.trials - done, catch=(PerFitError,))
    doc = write_results(tc, study, space, {"method": ref, "metrics": ref_rec["metrics"]} if ref_rec else None)
    if not doc["completed"]:  # nothing was chosen: not a result to exit 0 with
        errors = [t["error"] for t in doc["trials"] if t.get("error")]
        raise PerFitError(f"tune: none of the {len(doc['trials'])} trials completed (each is in "
                          f"{os.path.join(tc.output_dir, 'tune.json')}); the last failed with: "
                          f"{errors[-1] if errors else 'no recorded error'}")
    return doc


def reference_method(tc: TuneConfig) -> str | None:
    if tc.reference == "none":
        return None
    from .report import default_reference

    ref = tc.reference or default_reference(get_task(tc.task_name))
    if ref not in METHODS or ref == tc.method:
        raise ConfigError(f"--reference {tc.reference}: give a method other than the one tuned ({', '.join(METHODS)}), "
                          f"or none")
    return ref


def write_results(tc: TuneConfig, study, space: dict, reference: dict | None = None) -> dict:
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    trials = [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
               "metrics": t.user_attrs.get("metrics"), "vs_reference": t.user_attrs.get("vs_reference")}
              | ({"error": t.user_attrs["error"]} if "error" in t.user_attrs else {})
              for t in study.get_trials(deepcopy=False)]
    doc = {"task": tc.task_name, "method": tc.method, "holdout": tc.holdout, "space": space, "trials": trials,
           "completed": len(complete), "reference": reference}
    if complete:
        best = study.best_trial
        doc["best"] = {"number": best.number, "value": best.value, "params": best.params}
        # resolved: the file keeps meaning the same settings when presets change later
        cfg = to_dict(dataclasses.replace(_compare_config(tc), **best.params).resolved()) | {"holdout": 0, "methods": tc.method}
        write_json_atomic(os.path.join(tc.output_dir, "best_config.json"), cfg)
    write_json_atomic(os.path.join(tc.output_dir, "tune.json"), doc)
    if complete:
        ref_line = (reference["method"], reference["metrics"][primary_metric(get_task(tc.task_name))]) if reference else None
        _plot(complete, space, os.path.join(tc.output_dir, "tune.png"), f"{tc.task_name}, {tc.method}: held-out score",
              ref_line)
    return doc


def _plot(trials, space: dict, path: str, title: str, ref_line: tuple[str, float] | None = None) -> None:
    from .extras import pyplot

    plt = pyplot(path)
    if plt is None:
        return

    names = list(space)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        xs = [t.params.get(name) for t in trials]
        ys = [t.value for t in trials]
        if space[name]["type"] == "categorical":
            cats = [str(c) for c in space[name]["choices"]]
            ax.scatter([cats.index(str(x)) for x in xs], ys, s=18)
            ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=7)
        else:
            ax.scatter(xs, ys, s=18)
            if space[name].get("log"):
                ax.set_xscale("log")
        if ref_line:
            ax.axhline(ref_line[1], color="grey", ls="--", lw=1, label=ref_line[0])
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
