"""`torchrun --nproc_per_node=2 -m perfit run` on CPU (gloo) against one process: stage 1 data-parallel gives the same
collective shift (float64 throughout: equal in principle, so equal to 1e-9), stage 2's users, split across the ranks,
and the predictions merged by rank 0 equal the single process's."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from perfit.store import UserStore

pytestmark = pytest.mark.slow
EXACT = dict(rtol=1e-9, atol=1e-12)


def _args(out, tiny_model_dir, data):
    return ["run", "--task_name=movie_tagging", f"--data_dir={data}", f"--output_dir={out}", f"--model_path={tiny_model_dir}", "--preset=paper",
            "--model_name=tiny", "--dtype=float64", "--intervene_layer=1;2", "--low_rank_dimension=4",
            "--user_low_rank_dimension=2", "--max_epoch=1", "--stage1_epochs=2", "--batch_size=4", "--max_length=512",
            "--user_group_size=1", "--lr=0.01", "--user_lr=0.01"]


def _outputs(out):
    run = os.path.realpath(os.path.join(out, "movie_tagging", "latest"))
    store = UserStore(os.path.join(run, "users.sqlite"))
    return {"stage1": load_file(os.path.join(run, "task_reft", "ckpt", "collective.safetensors")),
            "meta": json.load(open(os.path.join(run, "task_reft", "ckpt", "stage1.json"))),
            "users": {u: store.get(u) for u in store.users()}, "entries": store.entries(),
            "predictions": json.load(open(os.path.join(run, "result_data_type=user_top_100_history",
                                                       "user_top_100_history_all.json")))}


def test_torchrun_two_processes_equal_one(tiny_model_dir, data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PERFIT_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    one = subprocess.run([sys.executable, "-m", "perfit"] + _args(tmp_path / "one", tiny_model_dir, data),
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "perfit"] + _args(tmp_path / "two", tiny_model_dir, data),
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-4000:]
    assert two.stdout.count("results: ") == 1  # rank 0 alone writes and reports
    a, b = _outputs(tmp_path / "one"), _outputs(tmp_path / "two")
    assert a["meta"]["stats"]["ranks"] == 1 and b["meta"]["stats"]["ranks"] == 2
    assert b["meta"]["stats"]["steps"] == a["meta"]["stats"]["steps"]  # the same global steps, each split in two
    for k in a["stage1"]:
        torch.testing.assert_close(b["stage1"][k], a["stage1"][k], **EXACT, msg=k)
    assert all(t.dtype == torch.float64 for t in a["stage1"].values())
    assert b["users"].keys() == a["users"].keys() == {"u0000", "u0001", "u0002"}
    assert {e["rank"] for e in b["entries"].values()} == {0, 1}  # the groups went to both ranks
    for u in a["users"]:
        for k in a["users"][u]:
            torch.testing.assert_close(b["users"][u][k], a["users"][u][k], **EXACT, msg=f"{u} {k}")
    assert b["predictions"] == a["predictions"]
    assert b["meta"]["stats"]["epoch_losses"] == pytest.approx(a["meta"]["stats"]["epoch_losses"], rel=1e-10)
