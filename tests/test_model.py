"""PerFitModel: load a finished run from its folder alone, answer many users in one batch, personalize, forget."""
import json
import os
import re
import shutil

import pytest
import torch

from perfit import PerFitModel, pipeline
from perfit.cli import main
from perfit.data import DataError
from perfit.errors import RunStateError
from perfit.store import UserStore

from conftest import run_cfg

NEW = [{"id": "n1", "description": "A starship crew answers an alien signal.", "tag": "sci-fi"},
       {"id": "n2", "description": "Androids and a warp drive in a distant galaxy.", "tag": "sci-fi"},
       {"id": "n3", "description": "A wizard's quest through an enchanted forest.", "tag": "fantasy"}]


@pytest.fixture
def moved_run(finished_run, tmp_path):
    """The run dir alone, moved away from its data and output folder."""
    _, res = finished_run
    dst = tmp_path / "elsewhere" / "run"
    shutil.copytree(res["run_dir"], dst)
    return str(dst), res


def _queries(finished_run):
    cfg, res = finished_run
    from perfit.data import load_task_data

    td = load_task_data(cfg.data_dir, "movie_tagging")
    return [(u.user_id, q) for u in td.test_users for q in u.query]


def test_from_run_answers_as_predict_did(moved_run, finished_run):
    run, res = moved_run
    pm = PerFitModel.from_run(run)
    allres = json.load(open(os.path.join(run, "result_data_type=user_top_100_history", "user_top_100_history_all.json")))
    want = {q["id"]: q for u in allres for q in u["query"]}
    qs = _queries(finished_run)
    owners, inputs = [u for u, _ in qs] + ["stranger"], [q.input for _, q in qs] + [qs[0][1].input]
    out = pm.generate(owners, inputs)
    assert list(out[:-1]) == [want[q.id]["perfit"] for _, q in qs]
    assert out.without_personal_shift == ["stranger"]
    assert out[-1] == want[qs[0][1].id]["stage1"]  # an unknown user gets the stage-1 shifts
    assert list(pm.generate(owners[:-1], inputs[:-1], variant="zero_shot")) == [want[q.id]["zero_shot"] for _, q in qs]
    assert pm.cfg.intervene_layer == "1;2" and pm.info.hidden_size == 64


def assert_served(pm, user, stored):
    """The bank slot that answered `user` holds the factors of its stored shift (b exactly, W = (W - R) + R to 1e-6)."""
    slot = pm.bank.slot_of[(user, pm.store.version(user))]
    assert torch.equal(pm.bank.b[1][slot].cpu(), stored["layer.1.bias"])
    assert torch.allclose((pm.bank.WmR[1][slot] + pm.bank.R[1][slot]).cpu(), stored["layer.1.weight"], atol=1e-6)


def test_personalize_retrain_and_forget(moved_run, monkeypatch):
    run, _ = moved_run
    pm = PerFitModel.from_run(run)
    p0 = {k: v.cpu() for k, v in pm.collective.user_state(0).items()}
    rep = pm.personalize({"newcomer": NEW[:2]})["newcomer"]
    assert rep["items"] == rep["examples"] == 2 and len(rep["epoch_losses"]) == 1 and rep["final_loss"] == rep["epoch_losses"][0]
    store = UserStore(os.path.join(run, "users.sqlite"))
    first = store.get("newcomer")
    assert store.entry("newcomer")["history_digest"] == rep["history_digest"]
    assert max(float((first[k] - p0[k]).abs().max()) for k in first) > 1e-4  # trained away from P0
    assert pm.generate(["newcomer"], ["a film"]).without_personal_shift == []
    assert_served(pm, "newcomer", first)

    # a retraining that fails while storing leaves the previous shift in place, whole
    import perfit.store as st

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save", crash)  # serializing the new shift fails
    with pytest.raises(OSError, match="disk full"):
        pm.personalize({"newcomer": NEW})
    monkeypatch.undo()
    again = UserStore(os.path.join(run, "users.sqlite"))
    assert all(torch.equal(again.get("newcomer")[k], first[k]) for k in first)
    assert again.verify() == []

    # a retraining that succeeds replaces it, and the next answer uses the new shift
    rep2 = pm.personalize({"newcomer": NEW})["newcomer"]
    assert rep2["history_digest"] != rep["history_digest"] and rep2["items"] == 3
    second = UserStore(os.path.join(run, "users.sqlite")).get("newcomer")
    assert pm.generate(["newcomer"], ["a film"]).without_personal_shift == []
    assert_served(pm, "newcomer", second)
    assert not torch.equal(second["layer.1.weight"], first["layer.1.weight"])

    assert pm.forget("newcomer") is True
    assert "newcomer" not in UserStore(os.path.join(run, "users.sqlite")).users()
    assert pm.generate(["newcomer"], ["a film"]).without_personal_shift == ["newcomer"]
    assert pm.forget("newcomer") is False


def test_personalize_validates_items_and_writes_nothing(moved_run):
    run, _ = moved_run
    pm = PerFitModel.from_run(run)
    with pytest.raises(DataError) as e:
        pm.personalize({"a": [{"id": "1", "description": "x", "tag": "horror"}], "b": [], "c": [{"id": "1"}]})
    msg = str(e.value)
    assert "user 'a' profile item 0: field 'tag' value 'horror' is not one of the task's 15 labels" in msg
    assert "user 'b': no history items" in msg and "user 'c' profile item 0: missing field 'description'" in msg
    assert set(UserStore(os.path.join(run, "users.sqlite")).users()) == {"u0000", "u0001", "u0002"}


def test_cli_personalize_and_forget(moved_run, tmp_path, capsys):
    run, _ = moved_run
    hist = tmp_path / "h.json"
    hist.write_text(json.dumps([{"user_id": "cli-user", "profile": NEW}]))
    assert main(["personalize", "--run_dir", run, "--history", str(hist)]) == 0
    assert json.loads(capsys.readouterr().out)["cli-user"]["items"] == 3
    assert main(["forget", "--run_dir", run, "--user_id", "cli-user"]) == 0
    assert json.loads(capsys.readouterr().out) == {"user_id": "cli-user", "removed": True}
    hist.write_text("{not json")
    assert main(["personalize", "--run_dir", run, "--history", str(hist)]) == 2
    assert "malformed JSON" in capsys.readouterr().err


def test_readme_python_api_example_runs_as_written(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    pipeline.run(run_cfg(tiny_model_dir, data, "output"))  # what `perfit run` leaves in ./output
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    pm = ns["pm"]
    assert ns["out"].without_personal_shift == ["someone-new"] and len(ns["out"]) == 2
    assert not pm.has_user("someone-new")  # the example forgets the user it personalized
    assert "no personal shift: ['someone-new']" in capsys.readouterr().out


SAVED_CHILD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
from perfit.method import PerFitShifts
folder, model_path, rows, prompts, pad, eos = sys.argv[1], sys.argv[2], *map(json.loads, sys.argv[3:7])
model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
shifts = PerFitShifts.from_pretrained(folder)
L = max(map(len, prompts))
ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
with shifts.applied(model, rows):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=pad, eos_token_id=eos)
print(json.dumps([[t for t in seq] for seq in out[:, L:].tolist()]))
"""


def test_save_pretrained_loads_in_a_fresh_process_and_answers_as_the_run(moved_run, tmp_path):
    """A run's collective shift and two users' shifts saved with save_pretrained, loaded with from_pretrained in a
    fresh process that has only the base model and that folder, and applied to the model's own generate: the same
    tokens as PerFitModel.complete (a user and a user with no saved shift, who gets the collective shift + P0)."""
    import subprocess
    import sys

    from perfit.generate import Completion
    from perfit.method import PerFitConfig, PerFitShifts

    run, _ = moved_run
    pm = PerFitModel.from_run(run)
    a, b = pm.store.users()[:2]
    assert pm.save_pretrained(str(tmp_path / "saved"), [a, b]) == [a, b]
    got = PerFitShifts.from_pretrained(str(tmp_path / "saved"))
    assert got.config == PerFitConfig.from_dict(json.load(open(tmp_path / "saved" / "perfit_config.json")))
    assert got.config.layers == pm.cfg.layers and got.info[a]["history_digest"] == pm.store.entry(a)["history_digest"]
    assert all(torch.equal(got.users[b][k], pm.store.get(b)[k]) for k in got.users[b])
    with pytest.raises(RunStateError, match="nobody"):
        pm.save_pretrained(str(tmp_path / "other"), ["nobody"])

    rows = [a, b, None]
    prompts = pm.prompt_ids(["a film about dragons", "space war in the far future", "a quiet drama"])
    want = pm.complete([Completion(u or "stranger", p, 6) for u, p in zip(rows, prompts)])
    args = [str(tmp_path / "saved"), pm.cfg.model_path] + [json.dumps(x) for x in (rows, prompts, pm.tok.pad_token_id, pm.tok.eos_token_id)]
    child = subprocess.run([sys.executable, "-c", SAVED_CHILD, *args], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    hf = json.loads(child.stdout.strip().splitlines()[-1])
    for w, h in zip(want, hf):
        cut = h.index(pm.tok.eos_token_id) if pm.tok.eos_token_id in h else len(h)
        assert h[:cut] == w.tokens
    assert [w.personal_shift for w in want] == [True, True, False]
