import json
import os

import pytest
import torch

from perfit import pipeline
from perfit.cli import main
from perfit.config import RunConfig
from perfit.predict import greedy_generate
from perfit.shifts import Shifter
from perfit.store import UserStore, user_file
from perfit.train.batching import tokenize_prompt

from conftest import TINY_RUN


def _cfg(tiny_model_dir, data_dir, out, **kw):
    return RunConfig(**(TINY_RUN | dict(data_dir=data_dir, output_dir=out, model_path=tiny_model_dir) | kw))


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    cfg = _cfg(tiny_model_dir, data, out)
    return cfg, pipeline.run(cfg)


def test_end_to_end_outputs(finished_run):
    cfg, res = finished_run
    run = res["run_dir"]
    assert os.path.basename(run) == "lr=4_ulr=2_il=1.2_pl=f7+l7_ep=1_bs=4_seed=42_model=tiny"
    assert set(res["variants"]) == {"zero_shot", "stage1", "perfit"}
    for v in res["variants"].values():
        assert v["queries"] == 6 and set(v["metrics"]) == {"accuracy", "f1", "n"}
    per_module = 2 * 64 * 2 + 2
    assert res["variants"]["perfit"]["trainable_parameters"]["per_user"] == 2 * per_module
    assert res["variants"]["stage1"]["trainable_parameters"]["collective"] == 2 * (2 * 64 * 4 + 4) + 2 * per_module
    assert res["variants"]["perfit"]["train_seconds"] > res["variants"]["stage1"]["train_seconds"] > 0
    preds = json.load(open(os.path.join(run, "perfit_data_type=user_top_100_history", "predictions.json")))
    assert preds["task"] == "LaMP_2M" and len(preds["golds"]) == 6
    allres = json.load(open(os.path.join(run, "result_data_type=user_top_100_history", "user_top_100_history_all.json")))
    assert [u["user_id"] for u in allres] == ["u0000", "u0001", "u0002"]
    assert set(allres[0]["query"][0]) == {"id", "gold", "zero_shot", "stage1", "perfit"}
    assert os.path.isfile(os.path.join(run, "task_reft", "ckpt", "shifts.safetensors"))
    store = UserStore(os.path.join(run, "users"))
    assert len(store) == 3 and os.path.isfile(os.path.join(run, "users", user_file("u0000")))
    assert pipeline.load_run_config(run).intervene_layer == "1;2"
    assert not [f for _, _, fs in os.walk(run) for f in fs if f.startswith(".tmp-")]


def test_stage1_reuse_and_invalidation(finished_run, tiny_model_dir, data, caplog, tmp_path):
    import dataclasses
    import shutil

    cfg, res = finished_run
    shutil.copytree(cfg.output_dir, tmp_path / "out")  # retraining below overwrites; keep the shared run intact
    cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "out"))
    res = dict(res, run_dir=os.path.join(str(tmp_path / "out"), "movie_tagging", os.path.basename(res["run_dir"])))
    caplog.set_level("INFO", logger="perfit")
    ctx = pipeline.prepare(cfg)
    before = os.path.getmtime(os.path.join(res["run_dir"], "task_reft", "ckpt", "shifts.safetensors"))
    pipeline.run_stage1(ctx)
    assert "reusing checkpoint" in caplog.text
    assert os.path.getmtime(os.path.join(res["run_dir"], "task_reft", "ckpt", "shifts.safetensors")) == before
    caplog.clear()
    ctx2 = pipeline.prepare(_cfg(tiny_model_dir, data, cfg.output_dir, run_dir_name=os.path.basename(res["run_dir"]), lr=5e-3))
    pipeline.run_stage1(ctx2)
    assert "other settings or data: retraining" in caplog.text
    # the user store refuses to mix users trained on another stage 1
    with pytest.raises(ValueError, match="user store was made with other settings"):
        pipeline.run_stage2(ctx2, pipeline.load_stage1(os.path.join(res["run_dir"], "task_reft", "ckpt"), ctx2.model)[0])


def test_stage2_rerun_keeps_stored_users(finished_run, caplog):
    cfg, res = finished_run
    users = os.path.join(res["run_dir"], "users")
    before = {f: os.path.getmtime(os.path.join(users, f)) for f in os.listdir(users)}
    caplog.set_level("INFO", logger="perfit")
    pipeline.stage2_only(cfg)
    assert "3 users already in the store, 0 to train" in caplog.text
    assert {f: os.path.getmtime(os.path.join(users, f)) for f in os.listdir(users)} == before


def test_reloaded_user_shift_gives_identical_predictions(finished_run):
    cfg, res = finished_run
    got = pipeline.predict_only(cfg)  # loads the checkpoint and the user store from disk only
    first = json.load(open(os.path.join(res["run_dir"], "result_data_type=user_top_100_history", "user_top_100_history_all.json")))
    assert got["variants"]["perfit"]["metrics"] == res["variants"]["perfit"]["metrics"]
    assert got["variants"]["perfit"]["train_seconds"] == res["variants"]["perfit"]["train_seconds"]
    again = json.load(open(os.path.join(res["run_dir"], "result_data_type=user_top_100_history", "user_top_100_history_all.json")))
    assert first == again


def test_mixed_user_generation_equals_each_user_alone(finished_run):
    cfg, res = finished_run
    ctx = pipeline.prepare(cfg)
    stage1, _ = pipeline.load_stage1(os.path.join(res["run_dir"], "task_reft", "ckpt"))
    store = UserStore(os.path.join(res["run_dir"], "users"))
    users = [u.user_id for u in ctx.data.test_users]
    sh = pipeline._init_from_stage1(ctx, stage1, len(users))
    store.load_into(sh, {u: k for k, u in enumerate(users)})
    sh.attach(ctx.model)
    prompts, owners = [], []
    for k, u in enumerate(ctx.data.test_users):
        for q in u.query:
            prompts.append(tokenize_prompt(ctx.tok, q.input + " x" * k, 500))  # different lengths: real padding
            owners.append(k)
    mixed = greedy_generate(ctx.model, ctx.tok, prompts, owners, sh, first=7, last=7, max_new_tokens=6, batch_size=16)
    alone = []
    for k in range(len(users)):
        rows = [i for i, o in enumerate(owners) if o == k]
        alone += greedy_generate(ctx.model, ctx.tok, [prompts[i] for i in rows], [k] * len(rows), sh, first=7, last=7,
                                 max_new_tokens=6, batch_size=1)
    sh.detach()
    assert mixed == alone
    assert len(set(mixed)) > 1


def test_generated_tokens_are_not_shifted(tok, llama):
    """With the shift on the last prompt token only, step-2 logits must match a manual shifted prefill."""
    sh = Shifter(64, [1], 4, 2, num_users=1, seed=3).attach(llama)
    prompt = tokenize_prompt(tok, "hello there", 100)
    a = greedy_generate(llama, tok, [prompt], [0], sh, first=0, last=1, max_new_tokens=3)
    b = greedy_generate(llama, tok, [prompt], [0], sh, first=0, last=1, max_new_tokens=3, batch_size=1)
    sh.detach()
    assert a == b


def test_headline_task_end_to_end(tiny_model_dir, data, tmp_path):
    res = pipeline.run(_cfg(tiny_model_dir, data, str(tmp_path), task_name="news_headline"))
    assert set(res["variants"]["perfit"]["metrics"]) == {"rouge-1", "rouge-L", "n"}


def test_cli_run_bad_data_exits_nonzero_and_writes_nothing(tiny_model_dir, data, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(os.path.join(data, "movie_tagging"), bad / "movie_tagging")
    users = json.load(open(bad / "movie_tagging" / "user_top_100_history.json"))
    users[1]["profile"][2]["tag"] = "horror"
    json.dump(users, open(bad / "movie_tagging" / "user_top_100_history.json", "w"))
    out = tmp_path / "out"
    rc = main(["run", "--task_name=movie_tagging", f"--data_dir={bad}", f"--output_dir={out}", f"--model_path={tiny_model_dir}"])
    assert rc == 2
    assert "user 'u0001' profile item 2: field 'tag' value 'horror'" in capsys.readouterr().err
    assert not out.exists()


def test_cli_layer_beyond_depth(tiny_model_dir, data, tmp_path, capsys):
    rc = main(["run", "--task_name", "movie_tagging", "--data_dir", data, "--output_dir", str(tmp_path), "--model_path", tiny_model_dir,
               "--intervene_layer", "2;9"])
    assert rc == 2 and "the model has 4 decoder layers" in capsys.readouterr().err


def test_cli_bad_shift_init_fails_before_any_output(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["run", "--shift_init", "ones", "--output_dir", str(out)]) == 2
    assert "shift_init 'ones'" in capsys.readouterr().err and not out.exists()


class _Scripted(torch.nn.Module):
    """Emits a fixed token script whatever the input (to test the decoder's stopping rules)."""

    def __init__(self, script, vocab):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.script, self.vocab, self.step = script, vocab, 0

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=True, cache=None, logits_to_keep=0):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        return type("Out", (), {"logits": logits, "cache": object()})()


def test_decoder_skips_leading_newlines_and_stops_at_the_next(tok):
    nl, a, b, eos = tok("\n")["input_ids"][0], tok("a")["input_ids"][0], tok("b")["input_ids"][0], tok.eos_token_id
    assert greedy_generate(_Scripted([nl, nl, a, b, nl, a], len(tok)), tok, [[5, 6]], max_new_tokens=10) == ["ab"]
    assert greedy_generate(_Scripted([a, eos, b], len(tok)), tok, [[5, 6]], max_new_tokens=10) == ["a"]
    assert greedy_generate(_Scripted([a, nl, b], len(tok)), tok, [[5, 6]], max_new_tokens=3, stop_early=False) == ["a"]


@pytest.mark.parametrize("first,last,users", [(3, 2, True), (0, 3, True), (3, 2, False), (0, 0, False)])
def test_shared_prefix_generation_equals_full_prefill(tok, llama, first, last, users):
    """A batch's shared instruction runs once (once per user when a shift acts inside it): the prefill logits and
    the generations equal those of full left-padded prefills, for mixed users, collective only, and no shift."""
    from perfit.predict import _prefill
    from perfit.train.batching import shared_prompt_prefix

    sh = Shifter(64, [1, 2], 4, 2, num_users=3, seed=5).attach(llama)
    head = "Which tag fits this movie among the tags? description: "
    prompts = [tokenize_prompt(tok, head + d, 200) for d in ("a quiet drama", "space war", "x", "robots in love again", "ok")]
    owners = [0, 1, 2, 1, 0] if users else None
    shifter = sh if (first or last) else None
    assert 8 <= shared_prompt_prefix(prompts, first, last) <= len(tokenize_prompt(tok, head, 200))
    keep = {"logits_to_keep": 1}
    a, _, pa = _prefill(llama, prompts, owners, shifter, True, first, last, tok.pad_token_id, True, keep)
    b, _, pb = _prefill(llama, prompts, owners, shifter, True, first, last, tok.pad_token_id, False, keep)
    torch.testing.assert_close(a.logits[:, -1], b.logits[:, -1], rtol=1e-4, atol=1e-5)
    assert torch.equal(pa, pb)
    kw = dict(first=first, last=last, max_new_tokens=5, stop_early=False)
    shared = greedy_generate(llama, tok, prompts, owners, shifter, **kw)
    assert shared == greedy_generate(llama, tok, prompts, owners, shifter, share_prefix=False, **kw)
    sh.detach()


def test_holdout_split_never_uses_test_queries(tiny_model_dir, data, tmp_path):
    """Tuning mode: the last N history items become the queries (gold = their answer), the rest stays history."""
    from perfit.data import load_task_data

    ctx = pipeline.prepare(_cfg(tiny_model_dir, data, str(tmp_path), holdout=1), load_model=False)
    real = load_task_data(data, "movie_tagging")
    assert [u.user_id for u in ctx.data.test_users] == [u.user_id for u in real.test_users]
    for u, r in zip(ctx.data.test_users, real.test_users):
        assert u.profile == r.profile[:-1] and len(u.query) == 1
        q = u.query[0]
        assert q.gold == r.profile[-1]["tag"] and ctx.data.golds[q.id] == q.gold
        assert r.profile[-1]["description"] in q.input and q.input.rstrip().endswith("tag:")
    assert not set(ctx.data.golds) & set(real.golds)
    assert ctx.run_dir.endswith("_holdout=1")
    with pytest.raises(pipeline.DataError, match="holdout 99"):
        pipeline.prepare(_cfg(tiny_model_dir, data, str(tmp_path), holdout=99), load_model=False)
