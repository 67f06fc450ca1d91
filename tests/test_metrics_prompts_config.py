import json

import pytest

from conftest import write_json
from perfit.cli import build_parser, main
from perfit.config import CompareConfig, ConfigError, RunConfig
from perfit.data import DataError
from perfit.data.schema import Query
from perfit.metrics import classification_metrics, generation_metrics, paired_difference, per_query_scores
from perfit.prompts import PromptBuilder, clean_prediction
from perfit.tasks import get_task

MOVIE = get_task("movie_tagging")


def test_accuracy_and_lamp_macro_f1_by_hand():
    golds = {"1": "comedy", "2": "comedy", "3": "action", "4": "romance"}
    preds = {"1": "comedy", "2": " action ", "3": "action", "4": "Romance"}  # case matters; spaces are stripped
    m = classification_metrics(MOVIE, golds, preds)
    assert m["accuracy"] == pytest.approx(0.5)
    # comedy: P=1 R=.5 F=2/3; action: P=.5 R=1 F=2/3; romance: F=0; the other 12 labels count as 0
    assert m["f1"] == pytest.approx((2 / 3 + 2 / 3) / 15)


def test_rouge_by_hand():
    m = generation_metrics({"a": "the cat sat", "b": "dogs run fast"}, {"a": "the cat", "b": "cats walk"})
    # a: P=1, R=2/3 -> F=0.8 (both metrics); b: no overlap
    assert m["rouge-1"] == pytest.approx(0.4) and m["rouge-L"] == pytest.approx(0.4)


def test_standard_errors_and_paired_difference_by_hand():
    golds = {"1": "comedy", "2": "comedy", "3": "action", "4": "romance"}
    a = {"1": "comedy", "2": "action", "3": "action", "4": "Romance"}  # right, wrong, right, wrong
    b = {"1": "comedy", "2": "comedy", "3": "drama", "4": "drama"}     # right, right, wrong, wrong
    # scores 1,0,1,0: mean .5, sample variance 1/3, se = sqrt(1/3 / 4)
    assert classification_metrics(MOVIE, golds, a)["accuracy_se"] == pytest.approx((1 / 3 / 4) ** 0.5, abs=1e-12)
    assert per_query_scores(MOVIE, golds, a) == {"1": 1.0, "2": 0.0, "3": 1.0, "4": 0.0}
    # a - b per query: 0, -1, +1, 0 -> mean 0, sample variance 2/3, se = sqrt(2/3 / 4)
    d = paired_difference(MOVIE, golds, a, b)
    assert d["n"] == 4 and d["diff"] == pytest.approx(0.0, abs=1e-12) and d["se"] == pytest.approx((2 / 3 / 4) ** 0.5, abs=1e-12)
    head = get_task("news_headline")
    g, p = {"a": "the cat sat", "b": "dogs run fast"}, {"a": "the cat", "b": "cats walk"}
    m = generation_metrics(g, p)  # ROUGE-1 per query 0.8 and 0: se = |0.8 - 0| / 2
    assert per_query_scores(head, g, p) == pytest.approx({"a": 0.8, "b": 0.0}) and m["rouge-1_se"] == pytest.approx(0.4)
    assert paired_difference(head, g, p, p) == {"diff": 0.0, "se": 0.0, "n": 2}


def test_id_mismatch_names_ids():
    with pytest.raises(DataError, match=r"1 gold ids have no prediction: \['2'\].*1 predicted ids have no gold: \['9'\]"):
        classification_metrics(MOVIE, {"1": "comedy", "2": "action"}, {"1": "comedy", "9": "action"})


def test_cli_evaluate(tmp_path, capsys):
    write_json(str(tmp_path / "g.json"), {"task": "LaMP_2M", "golds": [{"id": "1", "output": "comedy"}, {"id": "2", "output": "action"}]})
    write_json(str(tmp_path / "p.json"), {"task": "LaMP_2M", "golds": [{"id": "1", "output": "comedy"}, {"id": "2", "output": "banana"}]})
    assert main(["evaluate", "--task_name", "movie_tagging", "--golds_json", str(tmp_path / "g.json"), "--preds_json", str(tmp_path / "p.json")]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 0.5
    write_json(str(tmp_path / "p.json"), {"task": "LaMP_2M", "golds": [{"id": "1", "output": "comedy"}]})
    assert main(["evaluate", "--task_name", "movie_tagging", "--golds_json", str(tmp_path / "g.json"), "--preds_json", str(tmp_path / "p.json")]) == 2
    assert "['2']" in capsys.readouterr().err


def test_prompts_match_method_exactly():
    pb = PromptBuilder(MOVIE)
    ex = pb.history_example({"id": "1", "description": "A space opera.", "tag": "sci-fi"})
    assert ex.prompt == ("Which tag does this movie relate to among the following tags? Just answer with the tag name without "
                         "further explanation. tags: [sci-fi, based on a book, comedy, action, twist ending, dystopia, dark comedy, "
                         "classic, psychology, fantasy, romance, thought-provoking, social commentary, violence, true story] "
                         "description: A space opera. tag:")
    assert ex.target == " sci-fi"
    news = PromptBuilder(get_task("news_categorize")).history_example({"id": "1", "text": "Vote.", "title": "t", "category": "politics"})
    assert news.prompt.endswith("religion] article: Vote. category:") and news.target == " politics"
    head = PromptBuilder(get_task("news_headline")).history_example({"id": "1", "text": "Body.", "title": "Head"})
    assert (head.prompt, head.target) == ("Generate a headline for the following article: Body. headline:", " Head")
    # a query ends with the template's answer cue, as history prompts do; an input that has it is kept as given
    q = PromptBuilder(MOVIE).query_example(Query("q", "given input ", "comedy"))
    assert (q.prompt, q.target) == ("given input tag:", " comedy")
    assert PromptBuilder(MOVIE).query_example(Query("q", "description: x tag:")).prompt == "description: x tag:"
    assert PromptBuilder(get_task("news_categorize")).query_prompt("article: Vote.") == "article: Vote. category:"
    assert PromptBuilder(MOVIE, query_cue=False).query_example(Query("q", "given input")).prompt == "given input"


def test_truncation_and_custom_templates(tmp_path):
    pb = PromptBuilder(get_task("news_headline"), max_field_words=3)
    assert pb.prompt({"id": "1", "text": "one two three four five", "title": "x"}).endswith("one two three headline:")
    write_json(str(tmp_path / "p.json"), {"news_headline": {"prompt": "Title for: {text} =>", "target": " {title}"}})
    pb = PromptBuilder(get_task("news_headline"), str(tmp_path / "p.json"))
    assert pb.prompt({"id": "1", "text": "abc", "title": "x"}) == "Title for: abc =>"
    write_json(str(tmp_path / "bad.json"), {"news_headline": {"prompt": "{nope}", "target": " {title}"}})
    with pytest.raises(ValueError, match="unknown fields"):
        PromptBuilder(get_task("news_headline"), str(tmp_path / "bad.json"))


def test_clean_prediction():
    assert clean_prediction("  comedy\nmore text") == "comedy"
    assert clean_prediction("\n\n A headline\nmore") == "A headline"  # instruct models often open with a newline


SEED_PRESETS = {  # the paper's, as published (Llama-2-7B): --preset paper
    "movie_tagging": (32, 4, [14, 15], "f7+l7", 4), "news_categorize": (16, 32, [14, 15, 16], "f7+l7", 6),
    "news_headline": (32, 4, [14, 15, 16], "l7", 4)}


def test_presets_and_overrides():
    for task, want in SEED_PRESETS.items():
        c = RunConfig(task_name=task, model_path="/models/llama-2-7b", preset="paper").resolved()
        assert (c.low_rank_dimension, c.user_low_rank_dimension, c.layers, c.positions, c.max_epoch) == want
        assert (c.stage1_epochs, c.user_lr, c.shift_init, c.early_stopping, c.lr) == (want[4], 2e-3, "loreft", 0, 2e-3)
        c = CompareConfig(task_name=task, model_path="/m", max_epoch=3, preset="paper").resolved()
        assert (c.oppu_lr, c.oppu_epochs) == (1e-3, 3)  # OPPU trains each user as long as PerFit's stage 2
    c = RunConfig(task_name="news_headline", model_path="/m", user_low_rank_dimension=8, intervene_layer="3;1").resolved()
    assert (c.low_rank_dimension, c.user_low_rank_dimension, c.layers, c.positions) == (32, 8, [1, 3], "l7")
    assert c.default_run_dir().startswith("lr=32_ulr=8_il=1.3_pl=l7_ep=4_bs=8_seed=42_model=m_")  # the model's own name


def test_the_bundled_model_section_overlays_the_seed_presets_and_flags_beat_both():
    from perfit.tasks import BUNDLED_MODEL, TASKS, _packaged_json

    data = _packaged_json("presets.json")
    for task in TASKS:  # the new tasks' sections too (chosen on held-out history, docs/tuning.md)
        own = data["models"][BUNDLED_MODEL].get(task, {})
        c = CompareConfig(task_name=task).resolved()
        for k, v in (data[task] | own).items():
            assert getattr(c, k) == v, (task, k)
        flags = {"user_lr": 0.25, "shift_init": "loreft", "early_stopping": 0, "max_epoch": 3, "stage1_epochs": 2, "oppu_lr": 0.5,
                 "oppu_epochs": 5}
        c = CompareConfig(task_name=task, **flags).resolved()
        assert {k: getattr(c, k) for k in flags} == flags
    assert data["models"][BUNDLED_MODEL], "the bundled model has its own tuned section"
    for bad in ({"user_lr": -0.5}, {"oppu_lr": -2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CompareConfig(**bad).resolved()
    for bad in ({"positions": "x7"}, {"intervene_layer": "a;b"}, {"batch_size": 0}, {"task_name": "nope"}):
        with pytest.raises(ValueError):
            RunConfig(**bad).resolved()


# a valid other value for every field: a new field must be added here, with what it affects declared in config.py
ALTERNATIVE = {
    "task_name": "news_headline", "data_dir": "d2", "output_dir": "o2", "run_dir_name": "r2", "model_name": "m2",
    "model_path": "/m2", "preset": "paper", "cuda_device": 1, "dtype": "bfloat16", "seed": 7, "batch_size": 4, "eval_batch_size": 8,
    "low_rank_dimension": 8, "user_low_rank_dimension": 8, "intervene_layer": "3", "positions": "l3", "max_epoch": 2,
    "stage1_epochs": 1, "shift_init": "zero", "lr": 1e-3, "user_lr": 1e-3, "early_stopping": 2, "patience": 3, "max_users": 3, "max_stage1_examples": 10,
    "holdout": 2, "max_history": 5, "query_cue": 0, "max_field_words": 10, "max_length": 300, "rows_per_pass": 64,
    "user_group_size": 4, "cache_max_bytes": 1, "disk_cache_max_bytes": 1, "disk_cache_dir": "/c", "prompts_file": "p.json",
    "allow_overlap": 1, "overwrite": 1, "num_users": 3, "num_other_users": 3, "history_per_user": 3, "queries_per_user": 3,
    "methods": "rag", "rag_k": 3, "rag_item_words": 5, "lora_rank": 4, "lora_alpha": 8, "lora_targets": "q_proj",
    "lora_lr": 1e-2, "oppu_lr": 1e-2, "oppu_epochs": 3, "isolate": 0, "reference": "zero_shot",
    "personalize": "instant", "time_budget": "2h", "zero_shot": 0, "warm_epochs": 3, "generator": 1, "gen_width": 16, "gen_dropout": 0.2, "gen_lr": 1e-3,
    "gen_weight_decay": 0.1, "gen_epochs": 2, "gen_patience": 1, "gen_targets": 2, "gen_users_per_step": 4,
    "gen_holdout_fraction": 0.3,
}


def test_every_field_invalidates_exactly_the_artifacts_it_declares():
    import dataclasses

    from perfit.config import ARTIFACTS, METHODS, RECORD_INPUTS, CompareConfig, affects, artifact_keys, downstream

    base = CompareConfig()
    assert set(ALTERNATIVE) == {f.name for f in dataclasses.fields(CompareConfig)}
    keys0 = artifact_keys(base)
    records0 = {m: base.record_key(m) for m in METHODS}
    for name, declared in affects().items():
        alt = dataclasses.replace(base, **{name: ALTERNATIVE[name]})
        keys = artifact_keys(alt)
        want = downstream(declared)
        assert {a for a in ARTIFACTS if keys[a] != keys0[a]} == want, name
        assert {m for m in METHODS if alt.record_key(m) != records0[m]} == \
            {m for m in METHODS if want & set(RECORD_INPUTS[m] + ("predictions",))}, name


def test_keys_mean_what_they_say():
    """Spot checks written out by hand, independent of the declarations."""
    import dataclasses

    from perfit.config import CompareConfig, artifact_keys

    base = CompareConfig().resolved()
    k0 = artifact_keys(base)

    def changed(fps=None, **kw):
        k = artifact_keys(dataclasses.replace(base, **kw), fps)
        return {a for a in k if k[a] != k0[a]}

    assert changed(user_lr=1.0) == {"users", "stage2_only"}
    assert changed(lr=1.0) == {"stage1", "generator", "users"}  # not the task LoRA nor OPPU
    assert changed(gen_lr=1.0) == {"generator", "users"}
    assert changed(personalize="instant", warm_epochs=1) == {"users"}
    assert changed(lora_lr=1.0) == {"task_lora", "oppu"}
    assert changed(max_users=3) == {"predictions"}
    assert changed(holdout=2) == {"test_data", "users", "stage2_only", "oppu"}  # the store key holds holdout
    assert changed(rows_per_pass=64, user_group_size=2, eval_batch_size=1, cache_max_bytes=0, output_dir="x") == set()
    assert changed({"stage1_data": "other others file"}) == {"stage1_data", "stage1", "generator", "users", "task_lora",
                                                             "oppu"}
    assert changed({"test_data": "other templates"}) == {"test_data", "users", "stage2_only", "oppu"}
    # runs differ in their folder exactly when their stage-1 checkpoint or users could differ
    name = base.default_run_dir()
    other_init = "loreft" if base.shift_init == "zero" else "zero"
    for kw in ({"lr": base.lr / 2}, {"user_lr": base.user_lr / 2}, {"holdout": 1}, {"shift_init": other_init}):
        assert dataclasses.replace(base, **kw).default_run_dir() != name, kw
    for kw in ({"max_users": 3}, {"rows_per_pass": 64}, {"rag_k": 5}, {"lora_lr": 0.1}):
        assert dataclasses.replace(base, **kw).default_run_dir() == name, kw


def test_tiny_tokenizer_ids_are_the_same_in_every_process():
    """Byte b is id 3 + b (tokenizers' ByteLevel alphabet comes in a random order per process)."""
    from perfit.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    assert tok("hA\u00e9")["input_ids"] == [3 + ord("h"), 3 + ord("A"), 3 + 0xC3, 3 + 0xA9]
    assert tok.decode(tok("mixed é text")["input_ids"]) == "mixed é text"


def test_cli_accepts_both_flag_forms():
    p = build_parser()
    a = p.parse_args(["run", "--task_name=news_headline", "--cuda_device", "0", "--intervene_layer=14;15", "--max_epoch", "2",
                      "--run_dir_name=x", "--seed=3", "--batch_size", "4", "--model_name=m", "--model_path", "/m",
                      "--low_rank_dimension=8", "--user_low_rank_dimension", "2", "--positions=l7", "--data_dir", "d", "--output_dir=o"])
    assert (a.task_name, a.intervene_layer, a.max_epoch, a.batch_size, a.positions, a.output_dir) == ("news_headline", "14;15", 2, 4, "l7", "o")


def test_config_files_with_flags_on_top(tmp_path, capsys):
    """--config takes JSON or YAML of RunConfig fields; flags given override it; a wrong file is a one-line error."""
    from perfit.cli import _config

    (tmp_path / "c.yaml").write_text("task_name: news_headline\nlr: 0.01\nmax_users: 5\n")
    (tmp_path / "c.json").write_text(json.dumps({"task_name": "news_headline", "lr": 0.01}))
    p = build_parser()
    for f in ("c.yaml", "c.json"):
        cfg = _config(p.parse_args(["run", "--config", str(tmp_path / f), "--lr", "0.5"]))
        assert (cfg.task_name, cfg.lr) == ("news_headline", 0.5)
    assert _config(p.parse_args(["run", "--config", str(tmp_path / "c.yaml")])).max_users == 5
    (tmp_path / "bad.yaml").write_text("lr: 0.01\nlearning_rate: 3\n")
    assert main(["run", "--config", str(tmp_path / "bad.yaml"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "unknown RunConfig fields ['learning_rate']" in capsys.readouterr().err
    (tmp_path / "typo.json").write_text('{"lr": "fast"}')
    assert main(["run", "--config", str(tmp_path / "typo.json"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "--lr must be float, got 'fast'" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('{"lr": ')
    assert main(["run", "--config", str(tmp_path / "broken.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_compare_methods_and_reference_are_checked():
    assert CompareConfig(methods="perfit, oppu", reference="oppu").method_list() == ["perfit", "oppu"]
    with pytest.raises(ConfigError, match=r"--methods: unknown methods \['opu'\]"):
        CompareConfig(methods="perfit,opu").method_list()
    with pytest.raises(ConfigError, match=r"--reference zero_shot: not among --methods \(perfit, oppu\)"):
        CompareConfig(methods="perfit,oppu", reference="zero_shot").method_list()


def test_depth_relative_layers_resolve_on_each_depth():
    """Fractions of depth give floor(f * depth), a collision moves up; absolute layers stay as given; the paper's
    14/32;15/32 is 14;15 on its 32-layer Llama and lands as high on shallower models."""
    from perfit.config import parse_layer_spec, resolve_layers

    assert resolve_layers("14/32;15/32", 32) == [14, 15] and resolve_layers("14;15", 18) == [14, 15]
    assert resolve_layers("14/32;15/32;16/32", 18) == [7, 8, 9] and resolve_layers("14/32;15/32", 30) == [13, 14]
    assert resolve_layers("0.45;0.46", 6) == [2, 3]  # both floor to 2: the second moves up
    assert resolve_layers("0.5;3", 4) == [2, 3] and str(parse_layer_spec("0.25;1/2")[0]) == "1/4"
    assert RunConfig(intervene_layer="0.5;0.25").resolved().intervene_layer == "1/4;1/2"  # one spelling per set
    with pytest.raises(ConfigError, match=r"intervene_layer 0.9;0.95;0.99 gives layers \[3, 4, 5\]: out of range"):
        resolve_layers("0.9;0.95;0.99", 4)
    with pytest.raises(ConfigError, match="relative to the model's depth"):
        RunConfig(intervene_layer="1/2").resolved().layers


def test_any_other_model_gets_the_transferable_recipe_with_depth_relative_layers():
    """--preset auto on a model that is not the bundled one: the any_model section over the seed's, its layers as
    fractions of depth that give the paper's layers on the paper's 32-layer model."""
    from perfit.config import resolve_layers
    from perfit.tasks import _packaged_json

    data = _packaged_json("presets.json")
    for task in SEED_PRESETS:
        c = CompareConfig(task_name=task, model_path="/models/any").resolved()
        for k, v in (data[task] | data["any_model"][task]).items():
            assert getattr(c, k) == (v if k != "intervene_layer" else c.intervene_layer), (task, k)
        assert resolve_layers(c.intervene_layer, 32) == SEED_PRESETS[task][2]  # the paper's layers on its model
    with pytest.raises(ConfigError, match="--preset 'mine': choose from auto, paper"):
        RunConfig(preset="mine").resolved()


def test_one_dtype_vocabulary_for_every_command():
    """`perfit run --dtype bf16` and `perfit serve --dtype bf16` accept the same names (serve refused bf16 before)."""
    from perfit.config import DTYPES, RunConfig, ServeConfig, check_fields

    for name in DTYPES:
        check_fields(RunConfig(dtype=name))
        check_fields(ServeConfig(run_dir="r", dtype=name))
    with pytest.raises(ConfigError, match="--dtype 'half'"):
        check_fields(ServeConfig(run_dir="r", dtype="half"))
