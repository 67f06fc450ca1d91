import dataclasses
import json
import logging
import os

import pytest
import torch

from perfit import compare as cmp
from perfit.baselines import lora, retrieval
from perfit.cli import main
from perfit.config import METHODS, CompareConfig
from perfit.tasks import get_task

from conftest import TINY_RUN


def _cfg(tiny_model_dir, data_dir, out, **kw):
    extra = dict(lora_lr=1e-2, oppu_lr=1e-2, isolate=0)
    return CompareConfig(**(TINY_RUN | extra | dict(data_dir=data_dir, output_dir=out, model_path=tiny_model_dir) | kw))


@pytest.fixture(scope="module")
def done(tiny_model_dir, data, tmp_path_factory):
    cfg = _cfg(tiny_model_dir, data, str(tmp_path_factory.mktemp("cmp")), methods=",".join(METHODS), gen_epochs=1)
    return cfg, cmp.compare(cfg)


def test_every_method_runs_and_is_reported(done):
    cfg, doc = done
    assert list(doc["methods"]) == list(METHODS)
    from perfit import metrics, pipeline

    exp = pipeline.prepare(cfg)
    for m, r in doc["methods"].items():
        assert r["queries"] == 6 and r["users"] == 3, m
        assert 50 < r["peak_memory_mib"] < 16384, m  # MiB of a process that imported torch (not bytes, not KiB)
        # the reported metrics are those of the method's own predictions against the golds
        preds = json.load(open(os.path.join(cfg.output_dir, "methods", f"{m}.json")))["predictions"]
        assert set(preds) == set(exp.golds) and r["metrics"] == metrics.evaluate(exp.data.task, exp.golds, preds), m
    # the no-model baseline by hand: each user's most frequent history label (ties: the latest)
    from collections import Counter

    want = {}
    for u in exp.data.test_users:
        c = Counter(it["tag"] for it in u.profile)
        best = max(c.values())
        label = next(it["tag"] for it in reversed(u.profile) if c[it["tag"]] == best)
        want |= {q.id: label for q in u.query}
    assert json.load(open(os.path.join(cfg.output_dir, "methods", "user_majority.json")))["predictions"] == want
    # "always the most frequent label" by hand: over the other users' history tags and gold query answers
    others = json.load(open(exp.data.others_path))
    c = Counter([it["tag"] for u in others for it in u["profile"]] + [q["gold"] for u in others for q in u["query"]])
    labels = exp.data.task.labels
    best = max(labels, key=lambda lab: (c[lab], -labels.index(lab)))
    glob_rec = json.load(open(os.path.join(cfg.output_dir, "methods", "global_majority.json")))
    assert glob_rec["predictions"] == {q: best for q in want} and glob_rec["settings"]["counts"][best] == c[best] > 0
    out = cfg.output_dir
    md = open(os.path.join(out, "comparison.md")).read()
    assert all(f"| {m} |" in md for m in METHODS)
    # each row against user_majority (classification's reference), query by query
    for m, r in doc["methods"].items():
        if m != "user_majority":
            preds = json.load(open(os.path.join(cfg.output_dir, "methods", f"{m}.json")))["predictions"]
            assert r["vs_reference"] == {"reference": "user_majority", **metrics.paired_difference(
                exp.data.task, exp.golds, preds, want)}, m
            d = r["vs_reference"]
            assert d["diff"] == pytest.approx(r["metrics"]["accuracy"] - doc["methods"]["user_majority"]["metrics"]["accuracy"], abs=1e-12)
            assert f"{d['diff']:+.3f} ± {d['se']:.3f}" in md.split(f"| {m} |")[1].split("\n")[0]
    assert "vs_reference" not in doc["methods"]["user_majority"]
    assert os.path.getsize(os.path.join(out, "comparison.png")) > 10_000
    on_disk = json.load(open(os.path.join(out, "comparison.json")))
    assert on_disk["methods"]["perfit"]["params_per_user"] == doc["methods"]["perfit"]["params_per_user"]
    # per-method files keep the predictions, one per query
    assert len(json.load(open(os.path.join(out, "methods", "oppu.json")))["predictions"]) == 6


def test_parameter_counts_match_hand_computed(done):
    _, doc = done
    m = doc["methods"]
    d, layers = 64, 2  # tiny Llama: hidden 64, 4 heads, 2 KV heads of 16 -> v_proj out 32; 4 decoder layers
    shift = lambda r: 2 * d * r + r  # noqa: E731  R and W (r x d each) and b (r)
    assert m["perfit"]["params_per_user"] == layers * shift(2)
    assert m["perfit"]["params_shared"] == layers * (shift(4) + shift(2))  # collective + P0
    assert m["stage1"]["params_per_user"] == 0 and m["stage1"]["params_shared"] == layers * (shift(4) + shift(2))
    assert m["perfit_stage2_only"]["params_per_user"] == layers * shift(6) and m["perfit_stage2_only"]["params_shared"] == 0
    lora_per_layer = 8 * (64 + 64) + 8 * (64 + 32)  # q: A 8x64, B 64x8; v: A 8x64, B 32x8
    assert m["oppu"]["params_per_user"] == 4 * lora_per_layer and m["oppu"]["params_shared"] == 4 * lora_per_layer
    assert m["task_lora"]["params_per_user"] == 0 and m["task_lora"]["params_shared"] == 4 * lora_per_layer
    for k in ("user_majority", "global_majority", "zero_shot", "rag"):
        assert m[k]["params_per_user"] == m[k]["params_shared"] == 0 and m[k]["bytes_per_user"] == 0
    # bytes on disk: fp32 tensors plus a safetensors header
    assert 4 * layers * shift(2) < m["perfit"]["bytes_per_user"] < 4 * layers * shift(2) + 4096
    assert 4 * 4 * lora_per_layer < m["oppu"]["bytes_per_user"] < 4 * 4 * lora_per_layer + 4096
    for k in ("oppu", "perfit"):  # seconds (not ms): a tiny user trains in well under a second, and not in zero time
        assert 1e-4 < m[k]["train_seconds_per_user"] < 10, k


def test_oppu_users_are_isolated(done):
    """User 2's stored adapter is exactly what training user 2 alone from the initial adapter gives: nothing of user 1
    (trained just before it) leaks in."""
    import glob

    from safetensors.torch import load_file

    from perfit import pipeline
    from perfit.backbone import load_backbone
    from perfit.batching import tokenize_examples
    from perfit.store import UserStore

    cfg, _ = done
    exp = pipeline.prepare(cfg)
    model, tok, _ = load_backbone(cfg.model_path)
    pm = lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    [task_lora] = glob.glob(os.path.join(cfg.output_dir, "movie_tagging", "baselines", "task_lora-*"))
    lora.load_adapter(pm, load_file(os.path.join(task_lora, "adapter.safetensors")))
    base = pm.merge_and_unload()
    upm = lora.add_lora(base, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed + 1)
    user = exp.data.test_users[1]
    ex = tokenize_examples(tok, [exp.builder.history_example(it, user.user_id) for it in user.profile], cfg.max_length)
    lora.train_lm(base, ex, epochs=cfg.max_epoch, batch_size=cfg.batch_size, lr=cfg.oppu_lr, pad_id=tok.pad_token_id,
                  seed=cfg.seed, key=user.user_id)
    mine = lora.adapter_state(upm)
    [oppu] = glob.glob(os.path.join(cfg.output_dir, "movie_tagging", "baselines", "oppu-*"))
    stored = UserStore(os.path.join(oppu, "users.sqlite")).get(user.user_id)
    assert mine.keys() == stored.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], stored[k], rtol=1e-5, atol=1e-6)
    other = UserStore(os.path.join(oppu, "users.sqlite")).get(exp.data.test_users[0].user_id)
    assert any((other[k] - stored[k]).abs().max() > 1e-4 for k in stored)


def test_rerun_reuses_finished_methods(done, caplog):
    cfg, doc = done
    with caplog.at_level(logging.INFO, logger="perfit"):
        again = cmp.compare(cfg)
    assert caplog.text.count("already done") == len(METHODS)
    assert again["methods"]["oppu"]["metrics"] == doc["methods"]["oppu"]["metrics"]
    # a method's own setting reruns that method only
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="perfit"):
        cmp.compare(dataclasses.replace(cfg, rag_k=1))
    assert caplog.text.count("already done") == len(METHODS) - 1 and "compare: running rag" in caplog.text


def test_cli_compare_isolated_headlines(tiny_model_dir, data, tmp_path, capsys):
    out = str(tmp_path / "o")
    args = ["compare", "--task_name", "news_headline", "--data_dir", data, "--output_dir", out, "--model_path", tiny_model_dir, "--preset", "paper",
            "--model_name", "tiny", "--intervene_layer", "1;2", "--methods", "user_majority,zero_shot", "--max_length", "512"]
    assert main(args) == 0
    md = capsys.readouterr().out
    assert "| user_majority |" in md and "rouge-1" in md
    rec = json.load(open(os.path.join(out, "methods", "zero_shot.json")))
    from perfit import metrics
    from perfit.data import load_task_data

    td = load_task_data(data, "news_headline")
    golds = {q.id: td.golds[q.id] for u in td.test_users for q in u.query}
    assert rec["metrics"] == metrics.evaluate(td.task, golds, rec["predictions"]) and set(rec["predictions"]) == set(golds)
    assert f"{rec['metrics']['rouge-1']:.3f}" in md.split("| zero_shot |")[1].split("\n")[0]
    assert 1e-4 < rec["generate_seconds_per_query"] < 30
    assert main(args[:-4] + ["--methods", "user_majority,nonsense"]) == 2
    # free text has no label to answer always: named, refused; the default list leaves it out
    assert main(args[:-4] + ["--methods", "global_majority"]) == 2
    assert "global_majority" not in CompareConfig(task_name="news_headline").method_list()


def test_user_majority_and_bm25():
    t = get_task("movie_tagging")
    items = [{"id": "1", "description": "a", "tag": "comedy"}, {"id": "2", "description": "b", "tag": "action"},
             {"id": "3", "description": "c", "tag": "action"}, {"id": "4", "description": "d", "tag": "comedy"}]
    assert retrieval.majority_answer(t, items, "q") == "comedy"  # tie: the label seen most recently
    assert retrieval.majority_answer(t, items[:3], "q") == "action"
    h = get_task("news_headline")
    hist = [{"id": "1", "text": "The senate passed the budget bill late on Friday", "title": "Budget passes"},
            {"id": "2", "text": "A recipe for sourdough bread with a crisp crust", "title": "Bake better bread"},
            {"id": "3", "text": "Marathon runners braved the heat in Boston", "title": "Hot marathon"}]
    q = "Generate a headline for the following article: how to keep your sourdough starter alive headline:"
    assert retrieval.majority_answer(h, hist, q) == "Bake better bread"
    idx = retrieval.UserIndex(h, hist)
    assert [it["id"] for it in idx.top("senate budget vote", 2)][0] == "1"
    from perfit.tasks import templates

    p = retrieval.rag_prompt(templates("news_headline"), "QUERY", idx.top("bread and marathon heat", 2), item_words=3)
    assert p.endswith(". QUERY") and p.count('" is the title for "') == 2 and ", and " in p
    assert '"A recipe for"' in p or '"Marathon runners braved"' in p  # fields cut to 3 words


def test_task_lora_is_reused_when_only_shift_settings_change(done, caplog):
    """The task LoRA (and so OPPU's base) depends on the stage-1 data and LoRA settings, not on PerFit's shifts: it
    lives outside the run dir, keyed by its own settings."""
    cfg, doc = done
    with caplog.at_level(logging.INFO, logger="perfit"):
        cmp.compare(dataclasses.replace(cfg, shift_init="zero", low_rank_dimension=2, methods="task_lora,perfit"))
    assert "compare: running perfit" in caplog.text and "task_lora already done" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="perfit"):  # fewer users: the record reruns, the trained LoRA is loaded
        again = cmp.compare(dataclasses.replace(cfg, shift_init="zero", max_users=2, methods="task_lora"))
    assert "compare: running task_lora" in caplog.text and "task LoRA:" not in caplog.text
    assert again["methods"]["task_lora"]["queries"] == 4
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="perfit"):
        cmp.compare(dataclasses.replace(cfg, lora_lr=5e-3, methods="task_lora"))
    assert "task LoRA:" in caplog.text


def test_a_run_dir_compare_made_reloads_as_a_run(tiny_model_dir, data, tmp_path):
    """The run dir keeps the run's fields only, so `from_run` (predict, serve, analyze) loads it and answers as
    compare's perfit row did; a run dir an older compare wrote, with compare's own fields too, still loads."""
    from perfit import pipeline
    from perfit.config import RunConfig
    from perfit.model import PerFitModel
    from perfit.rundir import CONFIG_FILE, load_run_config

    cfg = _cfg(tiny_model_dir, data, str(tmp_path / "c"), methods="perfit")  # its own folder: other tests rerun `done`'s
    cmp.compare(cfg)
    exp = pipeline.prepare(cfg)
    saved = json.load(open(os.path.join(exp.run_dir, CONFIG_FILE)))
    assert set(saved) == {f.name for f in dataclasses.fields(RunConfig)}
    pm = PerFitModel.from_run(exp.run_dir)
    qids, owners, inputs = exp.queries
    want = json.load(open(os.path.join(cfg.output_dir, "methods", "perfit.json")))["predictions"]
    assert dict(zip(qids, pm.generate(owners, inputs))) == want
    older = os.path.join(cfg.output_dir, "older")
    os.makedirs(older)
    json.dump(saved | {"methods": "perfit", "oppu_lr": 0.01, "reference": ""}, open(os.path.join(older, CONFIG_FILE), "w"))
    assert load_run_config(older) == load_run_config(exp.run_dir)
