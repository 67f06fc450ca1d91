import dataclasses
import json
import math
import os
import re
import shutil

import pytest

from perfit import pipeline
from perfit.cli import main
from perfit.errors import RunStateError
from perfit.model import PerFitModel
from perfit.store import UserStore

from conftest import run_cfg


def _all(run_dir):
    return json.load(open(os.path.join(run_dir, "result_data_type=user_top_100_history", "user_top_100_history_all.json")))


def test_end_to_end_outputs(finished_run):
    cfg, res = finished_run
    run = res["run_dir"]
    assert re.fullmatch(r"lr=4_ulr=2_il=1\.2_pl=f7\+l7_ep=1_bs=4_seed=42_model=tiny_[0-9a-f]{8}", os.path.basename(run))
    assert os.path.realpath(os.path.join(cfg.output_dir, "movie_tagging", "latest")) == os.path.realpath(run)
    assert set(res["variants"]) == {"zero_shot", "stage1", "perfit"}
    for v in res["variants"].values():
        assert v["queries"] == 6 and set(v["metrics"]) == {"accuracy", "accuracy_se", "f1", "n"}
    per_module = 2 * 64 * 2 + 2
    assert res["variants"]["perfit"]["trainable_parameters"]["per_user"] == 2 * per_module
    assert res["variants"]["stage1"]["trainable_parameters"]["collective"] == 2 * (2 * 64 * 4 + 4) + 2 * per_module
    preds = json.load(open(os.path.join(run, "perfit_data_type=user_top_100_history", "predictions.json")))
    assert preds["task"] == "LaMP_2M" and len(preds["golds"]) == 6
    allres = _all(run)
    assert [u["user_id"] for u in allres] == ["u0000", "u0001", "u0002"]
    assert set(allres[0]["query"][0]) == {"id", "gold", "zero_shot", "stage1", "perfit"}
    assert os.path.isfile(os.path.join(run, "task_reft", "ckpt", "collective.safetensors"))
    store = UserStore(os.path.join(run, "users.sqlite"))
    assert len(store) == 3 and store.users() == ["u0000", "u0001", "u0002"] and store.verify() == []
    e = store.entry("u0001")
    assert e["items"] == e["examples"] == 4 and len(e["history_digest"]) == 24 and len(e["epoch_losses"]) == 1
    # one epoch of a random tiny model on byte tokens: about the uniform cross-entropy over its 260 tokens
    assert e["final_loss"] == e["epoch_losses"][0] and abs(e["final_loss"] - math.log(260)) < 0.5
    assert json.load(open(os.path.join(run, "config.json")))["intervene_layer"] == "1;2"
    assert not [f for _, _, fs in os.walk(run) for f in fs if f.startswith(".tmp-")]


@pytest.fixture
def own_run(finished_run, tmp_path):
    """A copy of the finished run's output folder, free to change."""
    cfg, res = finished_run
    shutil.copytree(cfg.output_dir, tmp_path / "out", symlinks=True)
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "out"))
    return cfg, os.path.join(cfg.output_dir, "movie_tagging", os.path.basename(res["run_dir"]))


def _mtime(run_dir, *p):
    return os.path.getmtime(os.path.join(run_dir, *p))


def _stored_at(run_dir) -> dict:
    """When each user's shift was written (a retrained user gets a new time)."""
    return {u: e["stored_at"] for u, e in UserStore(os.path.join(run_dir, "users.sqlite")).entries().items()}


def test_rerun_reuses_everything(own_run, caplog):
    cfg, run = own_run
    before = (_mtime(run, "task_reft", "ckpt", "collective.safetensors"), _stored_at(run))
    caplog.set_level("INFO", logger="perfit")
    pipeline.run(cfg)
    assert "reusing checkpoint" in caplog.text and "3 users already in the store, 0 to train" in caplog.text
    assert (_mtime(run, "task_reft", "ckpt", "collective.safetensors"), _stored_at(run)) == before


def test_learning_rates_never_share_a_run_dir(own_run, caplog):
    """Runs that differ in lr or user_lr get their own run dir; a run that differs only in stage-2 settings takes
    the stage-1 checkpoint of its sibling instead of retraining it."""
    cfg, run = own_run
    caplog.set_level("INFO", logger="perfit")
    lr = pipeline.run(dataclasses.replace(cfg, lr=5e-3))
    assert lr["run_dir"] != run and "stage 1: 12 examples" in caplog.text
    caplog.clear()
    ulr = pipeline.run(dataclasses.replace(cfg, user_lr=5e-3))
    assert ulr["run_dir"] not in (run, lr["run_dir"])
    assert "reusing the checkpoint of" in caplog.text and "stage 1: 12 examples" not in caplog.text
    a, b = UserStore(os.path.join(run, "users.sqlite")).get("u0001"), UserStore(os.path.join(ulr["run_dir"], "users.sqlite")).get("u0001")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4  # other personal shifts
    # the original run is untouched
    assert UserStore(os.path.join(run, "users.sqlite")).config["settings"]["user_lr"] == cfg.user_lr


def test_explicit_run_dir_with_other_settings_is_refused_or_overwritten(own_run, caplog):
    cfg, run = own_run
    name = os.path.basename(run)
    with pytest.raises(RunStateError, match=r"stage-1 checkpoint was made with other settings.*lr: 0.01 -> 0.005"):
        pipeline.run(dataclasses.replace(cfg, run_dir_name=name, lr=5e-3))
    # a holdout run reusing the run dir would train on the items it holds out: its store is refused
    with pytest.raises(RunStateError, match="user store was made with other settings"):
        pipeline.run(dataclasses.replace(cfg, run_dir_name=name, holdout=1))
    caplog.set_level("INFO", logger="perfit")
    res = pipeline.run(dataclasses.replace(cfg, run_dir_name=name, lr=5e-3, overwrite=1))
    assert res["run_dir"] == run and "stage 1: 12 examples" in caplog.text and "emptying the user store" in caplog.text
    assert UserStore(os.path.join(run, "users.sqlite")).config["stage1_key"] == json.load(
        open(os.path.join(run, "task_reft", "ckpt", "stage1.json")))["stage1_key"]


def test_stage2_retrains_only_users_whose_history_changed(tiny_model_dir, data, tmp_path, caplog):
    """Each stored user records what it was trained on: when one user's history changes, only that user retrains
    (the stage-1 data, and so the store, are unchanged)."""
    d = tmp_path / "data"
    shutil.copytree(data, d)
    cfg = run_cfg(tiny_model_dir, str(d), str(tmp_path / "out"))
    run = pipeline.run(cfg)["run_dir"]
    path = d / "movie_tagging" / "user_top_100_history.json"
    users = json.load(open(path))
    users[1]["profile"] = users[1]["profile"][:-1]
    json.dump(users, open(path, "w"))
    before = _stored_at(run)
    caplog.set_level("INFO", logger="perfit")
    assert pipeline.run(cfg)["run_dir"] == run
    after = _stored_at(run)
    assert "reusing checkpoint" in caplog.text and "2 users already in the store, 1 to train" in caplog.text
    assert after["u0000"] == before["u0000"] and after["u0002"] == before["u0002"] and after["u0001"] != before["u0001"]
    assert UserStore(os.path.join(run, "users.sqlite")).entry("u0001")["items"] == 3


def test_predict_from_run_dir_alone(own_run, monkeypatch, capsys):
    """`perfit predict --run_dir R` takes every setting from the run, never reads user_others.json, and recomputes
    the run's predictions exactly (after they were deleted)."""
    from perfit.data import schema

    cfg, run = own_run
    first = _all(run)
    assert any(q["perfit"] != q["zero_shot"] for u in first for q in u["query"])  # a value that can differ
    shutil.rmtree(os.path.join(run, "result_data_type=user_top_100_history"))
    shutil.rmtree(os.path.join(run, "perfit_data_type=user_top_100_history"))
    real = schema.load_users

    def no_others(path, *a, **k):
        assert not path.endswith("user_others.json"), "predict read user_others.json"
        return real(path, *a, **k)

    monkeypatch.setattr(schema, "load_users", no_others)
    assert main(["predict", "--run_dir", run]) == 0
    assert "perfit" in capsys.readouterr().out
    assert _all(run) == first


def test_cli_generate_from_a_run(finished_run, capsys):
    cfg, res = finished_run
    run, qid = res["run_dir"], _all(res["run_dir"])[1]["query"][0]
    from perfit.data import load_task_data

    q = load_task_data(cfg.data_dir, "movie_tagging").test_users[1].query[0]
    assert main(["generate", "--run_dir", run, "--user_id", "u0001", "--input", q.input]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == qid["perfit"] and "no personal shift" not in out.err
    assert main(["generate", "--run_dir", run, "--user_id", "stranger", "--input", q.input]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == qid["stage1"] and "'stranger' has no personal shift" in out.err
    assert main(["generate", "--run_dir", str(run) + "-nope", "--user_id", "u", "--input", "x"]) == 2
    assert "not a PerFit run dir" in capsys.readouterr().err


def test_stage2_rerun_keeps_stored_users(own_run, caplog):
    cfg, run = own_run
    before = _stored_at(run)
    caplog.set_level("INFO", logger="perfit")
    pipeline.stage2_only(cfg)
    assert "3 users already in the store, 0 to train" in caplog.text
    assert _stored_at(run) == before


def test_headline_task_end_to_end(tiny_model_dir, data, tmp_path):
    res = pipeline.run(run_cfg(tiny_model_dir, data, str(tmp_path), task_name="news_headline", positions="l3"))
    assert set(res["variants"]["perfit"]["metrics"]) == {"rouge-1", "rouge-1_se", "rouge-L", "n"}
    pm = PerFitModel.from_run(res["run_dir"])
    assert pm.first == 0 and pm.last == 3


def test_cli_run_bad_data_exits_nonzero_and_writes_nothing(tiny_model_dir, data, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(os.path.join(data, "movie_tagging"), bad / "movie_tagging")
    users = json.load(open(bad / "movie_tagging" / "user_top_100_history.json"))
    users[1]["profile"][2]["tag"] = "horror"
    json.dump(users, open(bad / "movie_tagging" / "user_top_100_history.json", "w"))
    out = tmp_path / "out"
    rc = main(["run", "--task_name=movie_tagging", f"--data_dir={bad}", f"--output_dir={out}", f"--model_path={tiny_model_dir}", "--preset=paper"])
    assert rc == 2
    assert "user 'u0001' profile item 2: field 'tag' value 'horror'" in capsys.readouterr().err
    assert not out.exists()


def test_cli_layer_beyond_depth(tiny_model_dir, data, tmp_path, capsys):
    rc = main(["run", "--task_name", "movie_tagging", "--data_dir", data, "--output_dir", str(tmp_path), "--model_path", tiny_model_dir, "--preset", "paper",
               "--intervene_layer", "2;9"])
    assert rc == 2 and "the model has 4 decoder layers" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--user_group_size", "0"], "--user_group_size must be >= 1, got 0"),
    (["--max_length", "8"], "--max_length 8 must exceed the movie_tagging answer length (max_new_tokens 8)"),
    (["--rows_per_pass", "4", "--batch_size", "8"], "--rows_per_pass 4 must be at least --batch_size 8"),
    (["--cache_max_bytes", "-1"], "--cache_max_bytes must be >= 0, got -1"),
    (["--max_users", "-3"], "--max_users must be >= 0, got -3"),
    (["--holdout", "-1"], "--holdout must be >= 0"),
    (["--lr", "-0.1"], "--lr must be >= 0"),
    (["--shift_init", "ones"], "--shift_init 'ones': choose from loreft, zero"),
    (["--positions", "x7"], "--positions: positions must look like"),
    (["--intervene_layer", "a;b"], "--intervene_layer must be ';'-separated layer indices"),
    (["--intervene_layer", "1.5"], "1.5 is neither a layer index nor a fraction of depth in [0, 1)"),
    (["--dtype", "int8"], "--dtype 'int8': choose from"),
    (["--query_cue", "2"], "--query_cue 2: choose from 0, 1"),
])
def test_bad_flags_fail_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "o"
    assert main(["run", "--output_dir", str(out)] + flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_a_genuine_bug_keeps_its_traceback(monkeypatch):
    def broken(cfg, backbone=None):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(pipeline, "run", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["run"])


def test_overlap_between_test_and_training_data_is_an_error(tiny_model_dir, data, tmp_path, capfd, caplog):
    d = tmp_path / "leaky"
    shutil.copytree(os.path.join(data, "movie_tagging"), d / "movie_tagging")
    test = json.load(open(d / "movie_tagging" / "user_top_100_history.json"))
    others = json.load(open(d / "movie_tagging" / "user_others.json"))
    leaked = test[2]["query"][0]
    # an other user whose history holds the text of a test query (with its answer), and a test user id reused
    others[0]["profile"].append({"id": "leak", "description": leaked["input"].split("description: ")[1].rsplit(" tag:", 1)[0],
                                 "tag": leaked["gold"]})
    others[1]["user_id"] = test[0]["user_id"]
    json.dump(others, open(d / "movie_tagging" / "user_others.json", "w"))
    out = tmp_path / "out"
    args = ["run", f"--data_dir={tmp_path / 'leaky'}", f"--output_dir={out}", f"--model_path={tiny_model_dir}", "--preset=paper",
            "--intervene_layer=1;2", "--max_length=512", "--max_epoch=1"]
    assert main(args) == 2
    err = capfd.readouterr().err
    assert "test data overlaps the training data" in err and "--allow_overlap 2 to train without the items named" in err
    assert f"history item 'leak' of user {others[0]['user_id']!r} has the text of query {leaked['id']!r} of test user 'u0002'" in err
    assert f"user_others.json: user {test[0]['user_id']!r} is also a test user" in err
    assert not os.path.exists(out / "movie_tagging")  # nothing trained or written
    # compare plans PerFit's methods before running any (the plan scans the training data): the same one message,
    # exit 2, no traceback, no method run
    cmp_out = tmp_path / "cmp"
    cmp_args = ["compare", f"--data_dir={tmp_path / 'leaky'}", f"--output_dir={cmp_out}", f"--model_path={tiny_model_dir}",
                "--preset=paper", "--intervene_layer=1;2", "--max_length=512", "--max_epoch=1"]
    assert main(cmp_args + ["--methods=user_majority,stage1"]) == 2
    err = capfd.readouterr().err
    assert "test data overlaps the training data" in err and "Traceback" not in err
    assert not os.path.exists(cmp_out / "methods")
    # a method's own process says the same when it finds it (the peers' baselines are not planned)
    assert main(cmp_args + ["--methods=user_majority,task_lora"]) == 2
    err = capfd.readouterr().err
    assert "test data overlaps the training data" in err and "Traceback" not in err
    assert f"perfit: error: compare: task_lora stopped on the error above; the methods before it are kept in {cmp_out / 'methods'}" in err
    assert os.listdir(cmp_out / "methods") == ["user_majority.json"]
    caplog.set_level("INFO", logger="perfit")
    caplog.clear()
    assert main(args + ["--allow_overlap=1"]) == 0
    n_all = sum(len(u["profile"]) + sum(1 for q in u["query"] if q.get("gold")) for u in others)
    assert f"stage 1: {n_all} examples" in caplog.text and "kept, as --allow_overlap 1 asks" in caplog.text
    # 2 trains without what the check names: the leaked item and the other user that is a test user
    caplog.clear()
    assert main(args + ["--allow_overlap=2", f"--output_dir={tmp_path / 'dropped'}"]) == 0
    assert "these are left out of training (--allow_overlap 2)" in caplog.text
    u1 = others[1]
    n_kept = n_all - 1 - len(u1["profile"]) - sum(1 for q in u1["query"] if q.get("gold"))
    assert f"stage 1: {n_kept} examples" in caplog.text


def test_drop_mode_leaves_a_test_users_own_overlapping_item_out(data, tmp_path, caplog):
    from perfit.config import RunConfig

    d = tmp_path / "own"
    shutil.copytree(os.path.join(data, "movie_tagging"), d / "movie_tagging")
    test = json.load(open(d / "movie_tagging" / "user_top_100_history.json"))
    q = test[1]["query"][0]
    test[1]["profile"].append({"id": "own-leak", "description": q["input"].split("description: ")[1].rsplit(" tag:", 1)[0],
                               "tag": "comedy"})
    json.dump(test, open(d / "movie_tagging" / "user_top_100_history.json", "w"))
    cfg = RunConfig(data_dir=str(d), output_dir=str(tmp_path / "o"))
    kept = pipeline.prepare(dataclasses.replace(cfg, allow_overlap=1))
    caplog.set_level("INFO", logger="perfit")
    dropped = pipeline.prepare(dataclasses.replace(cfg, allow_overlap=2))
    pipeline.prepare(dataclasses.replace(cfg, allow_overlap=2))  # tune and compare prepare more than once
    assert caplog.text.count("own-leak") == 1
    ids = lambda exp: [[it["id"] for it in u.profile] for u in exp.data.test_users]  # noqa: E731
    assert "own-leak" in ids(kept)[1] and ids(dropped)[1] == [i for i in ids(kept)[1] if i != "own-leak"]
    assert ids(dropped)[0] == ids(kept)[0] and ids(dropped)[2] == ids(kept)[2]
    # what stage 1 trains on now depends on the test queries: its key says so
    assert dropped.fingerprints["stage1_data"] != kept.fingerprints["stage1_data"]


def test_holdout_split_never_uses_test_queries(tiny_model_dir, data, tmp_path):
    """Tuning mode: the last N history items become the queries (gold = their answer), the rest stays history."""
    from perfit.data import load_task_data

    exp = pipeline.prepare(run_cfg(tiny_model_dir, data, str(tmp_path), holdout=1))
    real = load_task_data(data, "movie_tagging")
    assert [u.user_id for u in exp.data.test_users] == [u.user_id for u in real.test_users]
    for u, r in zip(exp.data.test_users, real.test_users):
        assert u.profile == r.profile[:-1] and len(u.query) == 1
        q = u.query[0]
        assert q.gold == r.profile[-1]["tag"] and exp.data.golds[q.id] == q.gold
        assert r.profile[-1]["description"] in q.input and q.input.rstrip().endswith("tag:")
    assert not set(exp.data.golds) & set(real.golds)
    with pytest.raises(pipeline.DataError, match="holdout 99"):
        pipeline.prepare(run_cfg(tiny_model_dir, data, str(tmp_path), holdout=99))


def test_early_stopping_through_the_pipeline(tiny_model_dir, data, tmp_path):
    res = pipeline.run(run_cfg(tiny_model_dir, data, str(tmp_path), early_stopping=1, max_epoch=3, patience=1))
    entries = UserStore(os.path.join(res["run_dir"], "users.sqlite")).entries()
    for e in entries.values():  # 4 items: 3 train, the last validates
        assert e["items"] == 4 and 0 <= e["best_epoch"] <= 3 and len(e["val_losses"]) >= e["best_epoch"] + 1
        assert e["best_epoch"] == min(range(len(e["val_losses"])), key=e["val_losses"].__getitem__)
    # early stopping changes the users' shifts, so it gets a run dir of its own
    assert pipeline.prepare(run_cfg(tiny_model_dir, data, str(tmp_path), max_epoch=3, patience=1)).run_dir != res["run_dir"]


def test_a_stage1_that_learns_nothing_says_so(tiny_model_dir, data, tmp_path, capsys, finished_run):
    """Stage 1's loss on fixed training items, before and after, is recorded; a stage 1 whose loss did not fall (here
    a learning rate of 0) puts a warning in the summary that names what to try, and results.json says so."""
    from perfit.train.stages import MIN_FALL

    _, res = finished_run
    rec = res["stage1_learning"]  # the tiny random model learns little in one epoch: it is said
    assert rec["probe_examples"] == 12 and rec["loss_after"] < rec["loss_before"]
    assert rec["relative_fall"] == round(1 - rec["loss_after"] / rec["loss_before"], 4) < MIN_FALL and not rec["learned"]
    out = str(tmp_path / "o")
    assert main(["run", "--task_name", "movie_tagging", "--data_dir", data, "--output_dir", out, "--model_path",
                 tiny_model_dir, "--preset", "paper", "--model_name", "tiny", "--intervene_layer", "1;2", "--low_rank_dimension", "4",
                 "--user_low_rank_dimension", "2", "--max_epoch", "1", "--batch_size", "4", "--max_length", "512",
                 "--lr", "0", "--user_lr", "0.01"]) == 0
    printed = capsys.readouterr().out
    got = json.load(open(os.path.join(out, "movie_tagging", "latest", "results.json")))["stage1_learning"]
    assert got["learned"] is False and got["relative_fall"] == 0.0 and got["loss_before"] == got["loss_after"]
    assert "warning: stage 1 learned little" in printed and "Try a larger --lr (now 0)" in printed
