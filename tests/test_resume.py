"""Kill -9 at any moment, rerun the same command, get what an uninterrupted run gives: a real `perfit run` in a child
process, killed (SIGKILL, through the PERFIT_FAULT crash points) mid-epoch in stage 1, between user groups and in the
middle of writing a user."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from perfit.store import UserStore

pytestmark = pytest.mark.slow


def _run(out, tiny_model_dir, data, fault=None):
    args = [sys.executable, "-m", "perfit.cli", "run", "--task_name=movie_tagging", f"--data_dir={data}",
            f"--output_dir={out}", f"--model_path={tiny_model_dir}", "--preset=paper", "--model_name=tiny", "--intervene_layer=1;2",
            "--low_rank_dimension=4", "--user_low_rank_dimension=2", "--max_epoch=1", "--stage1_epochs=3",
            "--batch_size=4", "--max_length=512", "--user_group_size=1", "--lr=0.01", "--user_lr=0.01"]
    env = dict(os.environ) | ({"PERFIT_FAULT": fault} if fault else {})
    env.pop("PERFIT_FAULT", None) if not fault else None
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def _outputs(out):
    run = os.path.realpath(os.path.join(out, "movie_tagging", "latest"))
    store = UserStore(os.path.join(run, "users.sqlite"))
    return {"predictions": json.load(open(os.path.join(run, "result_data_type=user_top_100_history",
                                                       "user_top_100_history_all.json"))),
            "metrics": {v: r["metrics"] for v, r in json.load(open(os.path.join(run, "results.json")))["variants"].items()},
            "stage1": load_file(os.path.join(run, "task_reft", "ckpt", "collective.safetensors")),
            "users": {u: store.get(u) for u in store.users()}, "run": run}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    r = _run(out, tiny_model_dir, data)
    assert r.returncode == 0, r.stderr[-3000:]
    return _outputs(out)


@pytest.mark.parametrize("fault", ["train.step:5", "stage2.group_stored:1", "store.mid_write:2"],
                         ids=["mid-epoch-in-stage-1", "between-user-groups", "mid-write-of-a-user"])
def test_killed_run_resumes_to_identical_outputs(reference, tiny_model_dir, data, tmp_path, fault):
    out = str(tmp_path / "out")
    killed = _run(out, tiny_model_dir, data, fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = os.path.realpath(os.path.join(out, "movie_tagging", os.listdir(os.path.join(out, "movie_tagging"))[0]))
    if fault.startswith("train.step"):  # killed in epoch 2: epoch 1's state was saved, no checkpoint yet
        assert os.path.isfile(os.path.join(run, "task_reft", "stage1_state.safetensors"))
        assert not os.path.exists(os.path.join(run, "task_reft", "ckpt"))
    else:  # stage 2: what was stored is whole, what was being written is absent
        stored = UserStore(os.path.join(run, "users.sqlite")).users()
        assert stored == ["u0000"], stored
    again = _run(out, tiny_model_dir, data)
    assert again.returncode == 0, again.stderr[-3000:]
    if fault.startswith("train.step"):  # it continued from epoch 1's end (3 steps an epoch), it did not start over
        assert "stage 1: resuming at step 3" in again.stderr
    else:
        assert "reusing checkpoint" in again.stderr and "1 users already in the store, 2 to train" in again.stderr
    got = _outputs(out)
    assert got["predictions"] == reference["predictions"] and got["metrics"] == reference["metrics"]
    for k, t in reference["stage1"].items():
        assert torch.equal(got["stage1"][k], t), k
    assert got["users"].keys() == reference["users"].keys()
    for u, ts in reference["users"].items():
        assert all(torch.equal(got["users"][u][k], t) for k, t in ts.items()), u
    assert not os.path.exists(os.path.join(got["run"], "task_reft", "stage1_state.safetensors"))
    v = subprocess.run([sys.executable, "-m", "perfit.cli", "store", "verify", "--run_dir", got["run"]],
                       capture_output=True, text=True, timeout=120)
    assert v.returncode == 0 and json.loads(v.stdout) == {"users": 3, "problems": []}, v.stdout + v.stderr
