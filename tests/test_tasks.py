"""The whole public LaMP benchmark: every task is data in the task registry (tasks.py, configs/prompts.json,
presets.json, its generator), and every command works on each. Metrics and per-user baselines are checked on cases
worked out by hand; each new task runs end to end on the tiny model."""
import json
import math
from collections import Counter

import pytest

from perfit import metrics
from perfit.baselines import retrieval
from perfit.cli import main
from perfit.data import load_task_data
from perfit.data.overlap import OverlapCheck
from perfit.data.synthetic import apply_title_style, apply_tweet_style, generate
from perfit.errors import ConfigError
from perfit.prompts import PromptBuilder
from perfit.tasks import NOT_PUBLIC, TASKS, get_task

from conftest import TINY_RUN

NEW = ("citation", "product_rating", "scholarly_title", "tweet_paraphrase")


def test_the_registry_holds_lamp_1_to_7_but_6():
    assert {t.lamp_id for t in TASKS.values()} == {"LaMP_1", "LaMP_2M", "LaMP_2N", "LaMP_3", "LaMP_4", "LaMP_5", "LaMP_7"}
    assert "LaMP_6" in NOT_PUBLIC
    assert [metrics.primary_metric(get_task(t)) for t in NEW] == ["accuracy", "mae", "rouge-1", "rouge-1"]


# ------------------------------------------------------------------ metrics, by hand

def test_rating_reads_answers_as_lamp_does():
    v = metrics.rating_value
    assert v("4", "2") == 4.0 and v(" 3 ", "5") == 3.0 and v("4.5", "4") == 4.5
    assert v("7", "1") == 7.0  # a number outside the scale counts as it is (LaMP's float())
    # not a number: the end of the scale farthest from the gold
    assert v("four", "4") == 1.0 and v("", "2") == 5.0 and v("great!", "3") == 5.0 and v("nan", "5") == 1.0
    golds = {"a": "5", "b": "1", "c": "3", "d": "4"}
    preds = {"a": "4", "b": "1", "c": "five", "d": "2"}
    m = metrics.rating_metrics(get_task("product_rating"), golds, preds)
    errors = [1.0, 0.0, 2.0, 2.0]  # c: "five" reads as 5 (|1 - 3| = |5 - 3|: the tie goes to 5), |5 - 3| = 2
    assert m["mae"] == pytest.approx(sum(errors) / 4) and m["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 4))
    assert m["invalid"] == 1 and m["n"] == 4
    assert metrics.per_query_scores(get_task("product_rating"), golds, preds) == dict(zip("abcd", errors))


def test_citation_accuracy_and_f1_by_hand():
    t = get_task("citation")
    m = metrics.evaluate(t, {"1": "[1]", "2": "[2]", "3": "[1]"}, {"1": "[1]", "2": "[1]", "3": "1"})
    # [1]: 1 right of 2 predicted, 1 of 2 found -> F1 0.5; [2]: never predicted -> 0; "1" is not a label
    assert m["accuracy"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(0.25)


def test_generation_tasks_score_rouge():
    m = metrics.evaluate(get_task("tweet_paraphrase"), {"1": "lol i baked bread"}, {"1": "i baked bread"})
    assert m["rouge-1"] == pytest.approx(2 * (3 / 3) * (3 / 4) / (3 / 3 + 3 / 4))


# ------------------------------------------------------------------ generators with known preferences

@pytest.mark.parametrize("task", list(TASKS))
def test_every_generator_is_deterministic_and_valid(tmp_path, task):
    for d, seed in (("a", 7), ("b", 7), ("c", 8)):
        generate(task, str(tmp_path / d), num_users=4, history_per_user=6, queries_per_user=3, num_other_users=2, seed=seed)
    files = ["user_others.json", "user_top_100_history.json", "user_top_100_history_label.json", "manifest.json"]
    read = lambda d, f: (tmp_path / d / task / f).read_text()  # noqa: E731
    assert all(read("a", f) == read("b", f) for f in files) and read("a", files[1]) != read("c", files[1])
    td = load_task_data(str(tmp_path / "a"), task)
    assert len(td.test_users) == 4 and len(td.golds) == 12 and len(list(td.iter_others())) == 2
    pb = PromptBuilder(td.task)
    for u in td.test_users:  # a query's text is never one of the user's items
        assert not {pb.query_content(q.input) for q in u.query} & {it.get(pb.content_field) for it in u.profile}


@pytest.mark.parametrize("task", list(TASKS))
def test_generated_data_at_the_run_defaults_shares_no_text_between_test_and_training(tmp_path, task):
    """The data `perfit run` generates without flags must pass its own overlap check: no test query's text among the
    other users' queries or items (tweet_paraphrase's pool of 84 texts once ran out at these sizes)."""
    from perfit.config import RunConfig

    c = RunConfig()
    generate(task, str(tmp_path), c.num_users, c.history_per_user, c.queries_per_user, c.num_other_users, c.seed)
    td = load_task_data(str(tmp_path), task)
    pb = PromptBuilder(td.task)
    test_q = {pb.query_content(q.input) for u in td.test_users for q in u.query}
    others = list(td.iter_others())
    train = {pb.query_content(q.input) for u in others for q in u.query} | {it.get(pb.content_field) for u in others for it in u.profile}
    assert len(test_q) == c.num_users * c.queries_per_user and not test_q & train
    check = OverlapCheck(td.test_users, pb)  # the check `perfit run` applies (ids, normalised texts, own histories)
    check.tests(td.test_users)
    for u in others:
        check.other(u)
    assert check.count == 0, check.message()


def test_a_generator_out_of_distinct_texts_says_so(tmp_path, monkeypatch):
    from perfit.data import synthetic

    monkeypatch.setattr(synthetic, "ACTIVITIES", synthetic.ACTIVITIES[:1])
    monkeypatch.setattr(synthetic, "WHEN", synthetic.WHEN[:1])
    with pytest.raises(ConfigError, match="tweet_paraphrase: the generator ran out of distinct item texts after 42 items"):
        generate("tweet_paraphrase", str(tmp_path), num_users=4, history_per_user=10, queries_per_user=3, num_other_users=0)
    assert not (tmp_path / "tweet_paraphrase").exists()  # nothing half-written


def _data(tmp_path, task, **kw):
    kw = dict(num_users=30, history_per_user=20, queries_per_user=10, num_other_users=0, seed=3) | kw
    generate(task, str(tmp_path), **kw)
    return json.load(open(tmp_path / task / "manifest.json")), load_task_data(str(tmp_path), task)


def test_citation_gold_is_the_option_on_the_users_preferred_field(tmp_path):
    man, td = _data(tmp_path, "citation")
    pb = PromptBuilder(td.task)
    qs = [(q, u) for u in td.test_users for q in u.query]
    for q, u in qs:
        order = man["queries"][q.id]["candidates"]  # the fields of [1] and [2]
        pref = man["users"][u.user_id]["preference"]
        assert q.gold == ("[1]" if pref.index(order[0]) < pref.index(order[1]) else "[2]")
        assert set(pb.options(q.input)) == {"[1]", "[2]"}
    golds = Counter(q.gold for q, _ in qs)
    assert abs(golds["[1]"] - golds["[2]"]) < 0.2 * len(qs)  # a user-blind guess gets about half
    per_user = sum(retrieval.majority_answer(td.task, u.profile, q.input, options=pb.options(q.input)) == q.gold
                   for q, u in qs)
    assert per_user / len(qs) > 0.7  # the user's own papers say which field it prefers


def test_ratings_are_sentiment_plus_the_users_bias(tmp_path):
    man, td = _data(tmp_path, "product_rating")
    qs = [(q, u) for u in td.test_users for q in u.query]
    for q, u in qs:
        s, b = man["queries"][q.id]["truth"]["sentiment"], man["users"][u.user_id]["bias"]
        assert q.gold == str(min(5, max(1, s + b)))
    blind = sum(abs(man["queries"][q.id]["truth"]["sentiment"] - int(q.gold)) for q, _ in qs) / len(qs)
    mean_rounded = {q.id: retrieval.majority_answer(td.task, u.profile, q.input) for q, u in qs}
    per_user = metrics.rating_metrics(td.task, td.golds, mean_rounded)["mae"]
    always5 = metrics.rating_metrics(td.task, td.golds, {q.id: "5" for q, _ in qs})["mae"]
    assert blind > 0.5 and per_user > 0.5 and always5 > 1.0  # neither the text nor the user alone gets it


def test_titles_and_tweets_follow_each_users_style(tmp_path):
    man, td = _data(tmp_path, "scholarly_title", num_users=12, history_per_user=4, queries_per_user=2)
    assert len({json.dumps({k: v for k, v in p.items() if k != "test"}, sort_keys=True) for p in man["users"].values()}) >= 6
    assert apply_title_style({"pattern": "Towards {Topic} in {Field}", "case": "lower", "acronym": True}, "X",
                             "motion planning", "robotics") == "MP: towards motion planning in robotics"
    man, td = _data(tmp_path, "tweet_paraphrase", num_users=12, history_per_user=4, queries_per_user=2)
    style = {"lower": True, "abbrev": True, "emoji": ":)", "hashtag": True, "opener": "omg", "bang": True}
    assert apply_tweet_style(style, "Today I went to the park for you.", "park") == "omg today i went 2 the park 4 u!! #park :)"
    for u in td.test_users:
        pref = man["users"][u.user_id]
        for it in u.profile:
            assert it["text"].endswith(pref["emoji"]) and (("#" in it["text"]) == pref["hashtag"])


# ------------------------------------------------------------------ per-user baselines, by hand

def test_majority_style_baselines_by_hand():
    r = get_task("product_rating")
    assert retrieval.majority_answer(r, [{"score": "4"}, {"score": "5"}, {"score": "5"}], "q") == "5"  # 4.67
    assert retrieval.majority_answer(r, [{"score": "2"}, {"score": "3"}], "q") == "3"  # 2.5: halves go up
    c = get_task("citation")
    papers = [{"id": "1", "title": "Robust robot grasping", "abstract": "grasping with robot hands"},
              {"id": "2", "title": "Legged locomotion", "abstract": "robot walking"}]
    assert retrieval.majority_answer(c, papers, "q", options={"[1]": "Fast query optimization",
                                                               "[2]": "Learning robot grasping"}) == "[2]"
    t = get_task("tweet_paraphrase")
    tweets = [{"id": "1", "text": "lol baked bread 2day #bread"}, {"id": "2", "text": "ran in the rain #run"},
              {"id": "3", "text": "new guitar strings #music"}]  # BM25's idf needs a few documents to mean anything
    q = "Paraphrase the following tweet without any explanation before or after it: Today I baked bread."
    assert retrieval.majority_answer(t, tweets, q) == "lol baked bread 2day #bread"


# ------------------------------------------------------------------ the official layout and validation

def _official(tmp_path, task):
    """LaMP's official layout (one user per question, its profile inside) made from generated data."""
    generate(task, str(tmp_path / "gen"), num_users=4, history_per_user=5, queries_per_user=1, num_other_users=0, seed=1)
    users = json.load(open(tmp_path / "gen" / task / "user_top_100_history.json"))
    qs = [{"id": u["query"][0]["id"], "input": u["query"][0]["input"],
           "profile": [{k: v for k, v in it.items() if k != "date"} for it in u["profile"]]} for u in users]
    outs = {"task": get_task(task).lamp_id, "golds": [{"id": q["id"], "output": u["query"][0]["gold"]} for q, u in zip(qs, users)]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "o.json").write_text(json.dumps(outs))
    return qs, outs


@pytest.mark.parametrize("task", NEW)
def test_convert_lamp_and_validate_data_for_each_new_task(tmp_path, task, capsys):
    qs, outs = _official(tmp_path, task)
    assert main(["convert-lamp", "--task_name", task, "--questions", str(tmp_path / "q.json"), "--outputs",
                 str(tmp_path / "o.json"), "--output_dir", str(tmp_path / "conv")]) == 0
    td = load_task_data(str(tmp_path / "conv"), task)
    assert len(td.test_users) == 2 and all(len(u.profile) == 5 for u in td.test_users)
    assert main(["validate-data", "--task_name", task, "--data_dir", str(tmp_path / "conv")]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert summary["task"] == task and summary["test_users"] == 2
    # a bad item names the file, user, item and field
    bad = json.load(open(tmp_path / "conv" / task / "user_top_100_history.json"))
    field = get_task(task).target_field
    bad[0]["profile"][2][field] = "6" if task == "product_rating" else 17
    (tmp_path / "conv" / task / "user_top_100_history.json").write_text(json.dumps(bad))
    assert main(["validate-data", "--task_name", task, "--data_dir", str(tmp_path / "conv")]) == 2
    err = capsys.readouterr().err
    assert "user_top_100_history.json" in err and f"user {bad[0]['user_id']!r} profile item 2" in err and f"'{field}'" in err


def test_evaluate_cli_on_ratings(tmp_path, capsys):
    (tmp_path / "g.json").write_text(json.dumps({"task": "LaMP_3", "golds": [{"id": "1", "output": "5"}, {"id": "2", "output": "2"}]}))
    (tmp_path / "p.json").write_text(json.dumps({"task": "LaMP_3", "golds": [{"id": "1", "output": "4"}, {"id": "2", "output": "x"}]}))
    assert main(["evaluate", "--task_name", "product_rating", "--golds_json", str(tmp_path / "g.json"),
                 "--preds_json", str(tmp_path / "p.json")]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["mae"] == pytest.approx((1 + 3) / 2) and m["invalid"] == 1  # "x" for gold 2 reads as 5


# ------------------------------------------------------------------ end to end on the tiny model

@pytest.fixture(scope="module")
def new_data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("newdata"))
    for t in NEW:
        generate(t, d, num_users=3, history_per_user=4, queries_per_user=2, num_other_users=2, seed=0)
    return d


@pytest.mark.parametrize("task", NEW)
def test_run_compare_and_serve_each_new_task(tiny_model_dir, new_data, tmp_path, task):
    from fastapi.testclient import TestClient

    from perfit import PerFitModel, compare, pipeline
    from perfit.config import CompareConfig, RunConfig, ServeConfig
    from perfit.serve.app import create_app

    base = TINY_RUN | dict(task_name=task, data_dir=new_data, model_path=tiny_model_dir, max_length=512)
    res = pipeline.run(RunConfig(**base, output_dir=str(tmp_path / "run")))
    keys = metrics.report_keys(get_task(task))
    assert set(res["variants"]) == {"zero_shot", "stage1", "perfit"}
    assert all(set(keys) <= set(v["metrics"]) and v["queries"] == 6 for v in res["variants"].values())
    labelled = get_task(task).has_labels
    methods = ["user_majority"] + ["global_majority"] * labelled + ["zero_shot", "rag", "stage1", "perfit"]
    doc = compare.compare(CompareConfig(**base, output_dir=str(tmp_path / "cmp"), isolate=0, methods=",".join(methods)))
    assert list(doc["methods"]) == methods
    td = load_task_data(new_data, task)
    golds = {q.id: td.golds[q.id] for u in td.test_users for q in u.query}
    u0q = td.test_users[0].query[0].id
    for m, r in doc["methods"].items():
        preds = json.load(open(tmp_path / "cmp" / "methods" / f"{m}.json"))["predictions"]
        assert r["metrics"] == metrics.evaluate(td.task, golds, preds), m
    if labelled:  # one answer for every query, a label of the task
        g = json.load(open(tmp_path / "cmp" / "methods" / "global_majority.json"))["predictions"]
        assert len(set(g.values())) == 1 and g[u0q] in get_task(task).labels
    md = open(tmp_path / "cmp" / "comparison.md").read()
    assert f"| {keys[0]} ± se |" in md and (("lower is better" in md) == (task == "product_rating"))
    pm = PerFitModel.from_run(res["run_dir"])
    u = td.test_users[0]
    with TestClient(create_app(pm, ServeConfig(run_dir=res["run_dir"], max_wait_ms=0))) as client:
        r = client.post("/v1/generate", json={"user_id": u.user_id, "input": u.query[0].input})
        assert r.status_code == 200 and r.json()["output"] == pm.generate([u.user_id], [u.query[0].input])[0]
        r = client.post(f"/v1/users/{u.user_id}/history", json={"items": [{"id": "x"}]})
        assert r.status_code == 400 and get_task(task).item_fields[0] in r.json()["error"]["message"]


def test_tune_minimises_mae_and_citation_refuses_held_out_tuning(tiny_model_dir, new_data, tmp_path):
    from perfit.errors import ConfigError
    from perfit.tune import TuneConfig, tune

    space = tmp_path / "space.json"
    space.write_text(json.dumps({"user_lr": {"type": "float", "low": 1e-3, "high": 5e-2, "log": True}}))
    base = TINY_RUN | dict(data_dir=new_data, model_path=tiny_model_dir, max_length=512, holdout=1, trials=1,
                           space=str(space))
    doc = tune(TuneConfig(**(base | dict(task_name="product_rating", output_dir=str(tmp_path / "t")))))
    trial = doc["trials"][0]
    assert doc["completed"] == 1 and trial["value"] == trial["metrics"]["mae"]
    import optuna

    study = optuna.load_study(study_name="product_rating-perfit", storage=f"sqlite:///{tmp_path / 't' / 'tune.db'}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    with pytest.raises(ConfigError, match="citation's history items carry no answer of its own"):
        tune(TuneConfig(**(base | dict(task_name="citation", output_dir=str(tmp_path / "c")))))
    # tweet_paraphrase's history prompt is "tweet:" alone: every held-out query would be that text (it once ran every
    # trial into the overlap check and exited 0 with nothing chosen)
    with pytest.raises(ConfigError, match="tweet_paraphrase's history prompt 'tweet:' reads no field"):
        tune(TuneConfig(**(base | dict(task_name="tweet_paraphrase", output_dir=str(tmp_path / "w")))))
    assert not (tmp_path / "w" / "tune.db").exists() and not (tmp_path / "c" / "tune.db").exists()  # before any work


def test_a_tune_whose_every_trial_fails_is_an_error_naming_why(tiny_model_dir, new_data, tmp_path):
    from perfit.errors import PerFitError
    from perfit.tune import TuneConfig, tune

    space = tmp_path / "space.json"
    space.write_text(json.dumps({"intervene_layer": {"type": "categorical", "choices": ["98", "99"]}}))
    with pytest.raises(PerFitError, match=r"none of the 2 trials completed .*intervene_layer \[9[89]\] out of range"):
        tune(TuneConfig(**(TINY_RUN | dict(data_dir=new_data, model_path=tiny_model_dir, max_length=512, holdout=1,
                                           trials=2, sampler="grid", space=str(space), task_name="product_rating",
                                           output_dir=str(tmp_path / "t")))))
    doc = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert doc["completed"] == 0 and [t["state"] for t in doc["trials"]] == ["FAIL", "FAIL"]
    assert all("out of range" in t["error"] for t in doc["trials"])
    assert not (tmp_path / "t" / "best_config.json").exists()
