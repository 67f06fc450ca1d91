import json
import os
import shutil

import torch

from perfit import PerFitModel
from perfit.analyze import analyze, spectrum
from perfit.cli import main
from perfit.data import load_task_data


def test_spectrum_of_known_matrices():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 50, generator=g, dtype=torch.float64)
    rank1 = torch.randn(30, 1, generator=g, dtype=torch.float64) * v
    assert spectrum(rank1)["cumulative"][0] > 1 - 1e-12
    iso = torch.randn(400, 4, generator=g, dtype=torch.float64)
    assert 0.15 < spectrum(iso)["explained"][0] < 0.35  # four comparable directions


def test_analyze_recovers_rank_one_personal_shifts(finished_run, tmp_path):
    """Users whose personal shifts all move the hidden state along one direction (by different amounts): the analysis
    finds >= 99% of the personal shifts' squared norm in one direction."""
    cfg, res = finished_run
    run = str(tmp_path / "run")
    shutil.copytree(res["run_dir"], run)
    pm = PerFitModel.from_run(run)
    g = torch.Generator().manual_seed(3)
    basis = {l: torch.linalg.qr(torch.randn(64, 2, generator=g))[0] for l in pm.collective.layers}  # R^T, orthonormal
    users = pm.store.users()
    made = {}
    for k, u in enumerate(users):
        beta = [1.0, -2.0, 3.5][k % 3]
        t = {}
        for l, Rt in basis.items():
            t[f"layer.{l}.rotate_raw"] = Rt
            t[f"layer.{l}.weight"] = Rt.T.contiguous()  # W = R: the shift is R^T b whatever the state
            t[f"layer.{l}.bias"] = torch.tensor([beta, 0.0])
        made[u] = t
    pm.store.put_many(made)
    td = load_task_data(cfg.data_dir, "movie_tagging")
    out = analyze(PerFitModel.from_run(run), td.test_users, str(tmp_path / "a"))
    assert out["users"] == 3
    assert out["personal"]["cumulative"][0] >= 0.99
    assert out["total"]["cumulative"][0] < out["personal"]["cumulative"][0]  # the collective part is elsewhere
    assert os.path.getsize(tmp_path / "a" / "analysis.png") > 5000


def test_cli_analyze_on_a_finished_run(finished_run, tmp_path, capsys):
    _, res = finished_run
    assert main(["analyze", "--run_dir", res["run_dir"], "--output_dir", str(tmp_path / "o")]) == 0
    out = json.load(open(tmp_path / "o" / "analysis.json"))
    assert out["users"] == 3 and len(out["total"]["singular_values"]) == 3
    assert abs(sum(out["personal"]["explained"]) - 1) < 1e-9
    assert all(-1 <= c <= 1 for c in out["cosine_to_collective"]["per_user"].values())
    assert out["preference_vs_shift_distance"]["pairs"] == 3  # generated data: the manifest's true preferences
    assert "cumulative" in capsys.readouterr().out


def test_analyze_without_stored_users_is_a_clear_error(finished_run, tmp_path, capsys):
    _, res = finished_run
    run = str(tmp_path / "run")
    shutil.copytree(res["run_dir"], run)
    for u in ("u0000", "u0001", "u0002"):
        assert main(["forget", "--run_dir", run, "--user_id", u]) == 0
    capsys.readouterr()
    assert main(["analyze", "--run_dir", run, "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "none of these 3 test users has a stored shift" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o")
