"""perfit tune on the tiny Llama: trials scored on held-out history, stage 1 reused across trials that differ only in
stage-2 settings, the best settings written as a config, and a tune killed mid-trial resuming where it stopped."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from perfit.tune import TuneConfig, tune

from conftest import TINY_RUN


def _space(tmp_path):
    p = tmp_path / "space.json"
    p.write_text(json.dumps({"user_lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True},
                             "max_epoch": {"type": "int", "low": 1, "high": 2}}))
    return str(p)


def test_two_trials_on_held_out_history(tiny_model_dir, data, tmp_path, caplog):
    tc = TuneConfig(**(TINY_RUN | dict(data_dir=data, model_path=tiny_model_dir, output_dir=str(tmp_path / "t"),
                                       method="perfit", trials=2, holdout=1, space=_space(tmp_path))))
    caplog.set_level("INFO", logger="perfit")
    doc = tune(tc)
    assert doc["completed"] == 2 and len(doc["trials"]) == 2
    assert all(t["metrics"]["n"] == 3 for t in doc["trials"])  # 3 users x 1 held-out item: never the 6 test queries
    assert caplog.text.count("stage 1: 12 examples, ") == 1 and "reusing the checkpoint of" in caplog.text
    ref = doc["reference"]  # user_majority on the same 3 held-out items; paired, so the mean difference is exact
    assert ref["method"] == "user_majority" and ref["metrics"]["n"] == 3
    for t in doc["trials"]:
        assert t["vs_reference"]["n"] == 3
        assert t["vs_reference"]["diff"] == pytest.approx(t["value"] - ref["metrics"]["accuracy"], abs=1e-12)
    best = json.load(open(tmp_path / "t" / "best_config.json"))
    assert best["holdout"] == 0 and best["methods"] == "perfit"
    assert {k: best[k] for k in ("user_lr", "max_epoch")} == doc["best"]["params"]
    assert os.path.getsize(tmp_path / "t" / "tune.png") > 5000
    with pytest.raises(ValueError, match="--reference perfit: give a method other than the one tuned"):
        tune(dataclasses.replace(tc, reference="perfit"))
    with pytest.raises(ValueError, match="--holdout must be > 0"):
        tune(TuneConfig(**(TINY_RUN | dict(data_dir=data, model_path=tiny_model_dir, output_dir=str(tmp_path / "u")))))


@pytest.mark.slow
def test_a_killed_tune_resumes(tiny_model_dir, data, tmp_path):
    args = [sys.executable, "-m", "perfit", "tune", f"--data_dir={data}", f"--model_path={tiny_model_dir}", "--preset=paper",
            f"--output_dir={tmp_path / 't'}", "--trials=2", "--holdout=1", f"--space={_space(tmp_path)}"] + \
        [f"--{k}={v}" for k, v in TINY_RUN.items()]
    env = {k: v for k, v in os.environ.items() if k != "PERFIT_FAULT"}
    killed = subprocess.run(args, env=env | {"PERFIT_FAULT": "train.step:2"}, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    doc = json.load(open(tmp_path / "t" / "tune.json"))
    assert doc["completed"] == 2 and [t["state"] for t in doc["trials"]] == ["FAIL", "COMPLETE", "COMPLETE"]
    # the resumed sampler is seeded past the trials already drawn: no trial repeats the killed one's settings
    assert len({t["params"]["user_lr"] for t in doc["trials"]}) == 3


def test_grid_runs_every_combination_once(tiny_model_dir, data, tmp_path):
    space = tmp_path / "grid.json"
    space.write_text(json.dumps({"positions": {"type": "categorical", "choices": ["l2", "f1+l1"]},
                                 "max_epoch": {"type": "int", "low": 1, "high": 1}}))
    tc = TuneConfig(**(TINY_RUN | dict(data_dir=data, model_path=tiny_model_dir, output_dir=str(tmp_path / "t"),
                                       method="perfit", trials=5, holdout=1, space=str(space), sampler="grid",
                                       reference="none")))
    doc = tune(tc)  # 5 asked, the grid has 2: it stops when each has run once
    assert doc["completed"] == 2 and doc["reference"] is None
    assert sorted((t["params"]["positions"], t["params"]["max_epoch"]) for t in doc["trials"]) == [("f1+l1", 1), ("l2", 1)]
    float_space = tmp_path / "float.json"
    float_space.write_text(json.dumps({"user_lr": {"type": "float", "low": 1e-3, "high": 5e-2}}))
    with pytest.raises(ValueError, match="--sampler grid: 'user_lr' is a float range"):
        tune(TuneConfig(**(TINY_RUN | dict(data_dir=data, model_path=tiny_model_dir, output_dir=str(tmp_path / "u"),
                                           holdout=1, space=str(float_space), sampler="grid"))))
    assert not os.path.exists(tmp_path / "u" / "tune.db")  # refused before anything was written


def test_a_bug_in_a_trial_is_raised_not_counted_as_a_failed_trial(tiny_model_dir, data, tmp_path, monkeypatch):
    """Only what the user can fix (a PerFitError: bad settings, data, run state) fails a trial; a genuine bug (here a
    ValueError from inside the method) stops the tune with its traceback instead of becoming 'no trial completed'."""
    import perfit.baselines.methods as methods
    from perfit.errors import ConfigError, PerFitError

    def buggy(cfg, method):
        raise ValueError("index out of range somewhere deep")

    monkeypatch.setattr(methods, "run_method", buggy)
    tc = TuneConfig(**(TINY_RUN | dict(data_dir=data, model_path=tiny_model_dir, output_dir=str(tmp_path / "t"),
                                       method="perfit", trials=2, holdout=1, space=_space(tmp_path), reference="none")))
    with pytest.raises(ValueError, match="index out of range somewhere deep"):
        tune(tc)

    def refused(cfg, method):
        raise ConfigError("--user_lr: not this one")

    monkeypatch.setattr(methods, "run_method", refused)
    with pytest.raises(PerFitError, match="none of the 2 trials completed.*not this one"):
        tune(dataclasses.replace(tc, output_dir=str(tmp_path / "u")))
