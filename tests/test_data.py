import json
import os
import random
import shutil
from collections import Counter

import pytest

from conftest import shared_dir, write_json
from perfit.cli import main
from perfit.data import DataError, iter_json_array, load_task_data
from perfit.data.lamp import convert_lamp
from perfit.data.synthetic import generate
from perfit.prompts import PromptBuilder
from perfit.tasks import get_task

T = "movie_tagging"


def _valid_users():
    return [{"user_id": "alice", "profile": [{"id": "a1", "description": "a film", "tag": "comedy"},
                                             {"id": "a2", "description": "b film", "tag": "action"}],
             "query": [{"id": "q1", "input": "prompt 1", "gold": ""}]},
            {"user_id": "bob", "profile": [{"id": "b1", "description": "c film", "tag": "romance"}],
             "query": [{"id": "q2", "input": "prompt 2"}]}]


def _write(root, test=None, labels=None, others=None):
    d = os.path.join(root, T)
    write_json(os.path.join(d, "user_top_100_history.json"), test if test is not None else _valid_users())
    write_json(os.path.join(d, "user_top_100_history_label.json"),
               labels or {"task": "LaMP_2M", "golds": [{"id": "q1", "output": "comedy"}, {"id": "q2", "output": "action"}]})
    write_json(os.path.join(d, "user_others.json"), others if others is not None else _valid_users())
    return d


def _problems(tmp_path, **kw):
    _write(str(tmp_path), **kw)
    with pytest.raises(DataError) as e:
        td = load_task_data(str(tmp_path), T)
        list(td.iter_others())
    return str(e.value)


def test_valid_data_loads(tmp_path):
    _write(str(tmp_path))
    td = load_task_data(str(tmp_path), T)
    assert [u.user_id for u in td.test_users] == ["alice", "bob"]
    assert td.golds == {"q1": "comedy", "q2": "action"}
    assert len(list(td.iter_others())) == 2


def test_missing_field_names_file_user_item_field(tmp_path):
    users = _valid_users()
    del users[0]["profile"][1]["tag"]
    msg = _problems(tmp_path, test=users)
    assert "user_top_100_history.json: user 'alice' profile item 1: missing field 'tag'" in msg


def test_mistyped_field(tmp_path):
    users = _valid_users()
    users[1]["profile"][0]["description"] = 42
    msg = _problems(tmp_path, test=users)
    assert "user 'bob' profile item 0: field 'description' must be a string, got int" in msg


def test_label_outside_label_set(tmp_path):
    users = _valid_users()
    users[0]["profile"][0]["tag"] = "horror"
    msg = _problems(tmp_path, others=users)
    assert "user_others.json: user 'alice' profile item 0: field 'tag' value 'horror' is not one of the task's 15 labels" in msg


def test_empty_history(tmp_path):
    users = _valid_users()
    users[1]["profile"] = []
    assert "user 'bob': field 'profile' is empty" in _problems(tmp_path, test=users)


def test_duplicate_ids(tmp_path):
    users = _valid_users()
    users[0]["profile"][1]["id"] = "a1"
    assert "user 'alice' profile item 1: duplicate item id 'a1'" in _problems(tmp_path, test=users)
    users = _valid_users()
    users[1]["query"][0]["id"] = "q1"
    users.append(dict(users[1]))
    msg = _problems(tmp_path, test=users)
    assert "user 'bob': query id 'q1' also used by user 'alice'" in msg
    assert "user 'bob': duplicate user_id (user #2)" in msg


def test_query_without_gold_label(tmp_path):
    msg = _problems(tmp_path, labels={"task": "LaMP_2M", "golds": [{"id": "q1", "output": "comedy"}]})
    assert "user_top_100_history_label.json: no gold label for query ids ['q2'] of user 'bob'" in msg


def test_gold_outside_label_set_and_wrong_task(tmp_path):
    msg = _problems(tmp_path, labels={"task": "LaMP_4", "golds": [{"id": "q1", "output": "horror"}, {"id": "q2", "output": "action"}]})
    assert "field 'task' is 'LaMP_4' but task_name is 'movie_tagging'" in msg
    assert "golds[0] (id 'q1'): field 'output' value 'horror' is not one of the task's labels" in msg


def test_malformed_json(tmp_path):
    d = _write(str(tmp_path))
    with open(os.path.join(d, "user_others.json"), "w") as f:
        f.write('[{"user_id": "x", "profile": [}')
    with pytest.raises(DataError, match=r"user_others.json: malformed JSON near byte \d+"):
        list(load_task_data(str(tmp_path), T).iter_others())
    with open(os.path.join(d, "user_others.json"), "w") as f:
        f.write('{"user_id": "x"}')
    with pytest.raises(DataError, match=r"user_others.json: malformed JSON: expected a list"):
        list(load_task_data(str(tmp_path), T).iter_others())


def test_cli_validate_reports_and_exits_nonzero(tmp_path, capsys):
    users = _valid_users()
    users[0]["profile"][0]["tag"] = "horror"
    _write(str(tmp_path), test=users)
    assert main(["validate-data", "--task_name", T, "--data_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "user 'alice' profile item 0: field 'tag' value 'horror'" in err


def test_cli_validate_summary(tmp_path, capsys):
    _write(str(tmp_path))
    assert main(["validate-data", "--task_name", T, "--data_dir", str(tmp_path)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["test_users"], s["queries"], s["history_items"], s["other_users"]) == (2, 2, 3, 2)
    assert s["gold_labels"] == {"comedy": 1, "action": 1}


def test_streaming_matches_json_load(tmp_path):
    rnd = random.Random(0)
    data = [{"user_id": f"u{i}", "x": "é" * rnd.randint(0, 300), "n": [1, 2, {"a": "]"}]} for i in range(200)]
    p = tmp_path / "big.json"
    p.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    assert list(iter_json_array(str(p))) == data


def test_others_are_streamed_not_held(tmp_path):
    """load_users yields each user as it is validated: the first arrives before the file has been read through."""
    from perfit.data import load_users
    from perfit.tasks import get_task

    users = _valid_users() + [{"user_id": f"x{i}", "profile": [{"id": "1", "description": "d", "tag": "comedy"}], "query": []}
                              for i in range(5000)]
    p = tmp_path / "others.json"
    p.write_text(json.dumps(users))
    it = load_users(str(p), get_task(T), role="others")
    assert next(it).user_id == "alice"
    assert sum(1 for _ in it) == len(users) - 1


def test_generated_data_never_repeats_an_item_text(tmp_path):
    """A query's text never reappears as anyone's history item (the overlap check would refuse the data)."""
    for task in ("movie_tagging", "news_headline"):
        generate(task, str(tmp_path), num_users=20, history_per_user=20, queries_per_user=5, num_other_users=12, seed=0)
        field = "description" if task == "movie_tagging" else "text"
        test = json.load(open(tmp_path / task / "user_top_100_history.json"))
        others = json.load(open(tmp_path / task / "user_others.json"))
        texts = [it[field] for u in test + others for it in u["profile"]]
        pb = PromptBuilder(get_task(task))
        texts += [pb.query_content(q["input"]) for u in test + others for q in u["query"]]
        assert len(texts) == len(set(texts)) == 32 * 25


def test_convert_official_sample(tmp_path):
    s = shared_dir("lamp_official_sample")
    out = convert_lamp("news_categorize", os.path.join(s, "LaMP_22_dev_questions.json"), os.path.join(s, "LaMP_22_dev_outputs.json"),
                       str(tmp_path), others_questions=os.path.join(s, "LaMP_22_train_questions.json"),
                       others_outputs=os.path.join(s, "LaMP_22_train_outputs.json"))
    train = json.load(open(os.path.join(s, "LaMP_22_train_questions.json")))
    assert out["test_users"] == 3 and out["other_users"] == len(train) == 4
    td = load_task_data(str(tmp_path), "news_categorize")
    assert td.golds == {"112": "politics", "113": "sports", "114": "crime"}
    dev = {q["id"]: len(q["profile"]) for q in json.load(open(os.path.join(s, "LaMP_22_dev_questions.json")))}
    assert {u.query[0].id: len(u.profile) for u in td.test_users} == dev and all(len(u.query) == 1 for u in td.test_users)
    assert td.test_users[0].query[0].input.startswith("Which category does this article relate to")


def test_convert_cli_single_split(tmp_path, capsys):
    s = shared_dir("lamp_official_sample")
    rc = main(["convert-lamp", "--task_name", "news_categorize", "--questions", os.path.join(s, "LaMP_22_train_questions.json"),
               "--outputs", os.path.join(s, "LaMP_22_train_outputs.json"), "--output_dir", str(tmp_path)])
    assert rc == 0
    td = load_task_data(str(tmp_path), "news_categorize")
    others = list(td.iter_others())
    assert len(td.test_users) + len(others) == len(json.load(open(os.path.join(s, "LaMP_22_train_questions.json"))))
    assert min(len(u.profile) for u in td.test_users) >= max(len(u.profile) for u in others)


@pytest.mark.parametrize("task", ["movie_tagging", "news_categorize", "news_headline"])
def test_generator_deterministic_and_valid(tmp_path, task):
    generate(task, str(tmp_path / "a"), num_users=4, history_per_user=6, queries_per_user=3, num_other_users=2, seed=7)
    generate(task, str(tmp_path / "b"), num_users=4, history_per_user=6, queries_per_user=3, num_other_users=2, seed=7)
    generate(task, str(tmp_path / "c"), num_users=4, history_per_user=6, queries_per_user=3, num_other_users=2, seed=8)
    files = ["user_others.json", "user_top_100_history.json", "user_top_100_history_label.json", "manifest.json"]
    read = lambda d, f: (tmp_path / d / task / f).read_text()
    assert all(read("a", f) == read("b", f) for f in files)
    assert read("a", files[1]) != read("c", files[1])
    td = load_task_data(str(tmp_path / "a"), task)
    assert len(td.test_users) == 4 and len(td.golds) == 12 and len(list(td.iter_others())) == 2


@pytest.mark.parametrize("task", ["movie_tagging", "news_categorize"])
def test_generated_preferences_matter(tmp_path, task):
    """Knowing the user's preferences wins by a wide margin over ignoring the user."""
    generate(task, str(tmp_path), num_users=30, history_per_user=20, queries_per_user=10, num_other_users=0, seed=3)
    man = json.load(open(tmp_path / task / "manifest.json"))
    td = load_task_data(str(tmp_path), task)
    qs = [(q.id, u) for u in td.test_users for q in u.query]
    gold = td.golds
    oracle = sum(min(man["queries"][q]["candidates"], key=man["users"][u.user_id]["preference"].index) == gold[q] for q, u in qs)
    majority = Counter(gold.values()).most_common(1)[0][0]
    maj = sum(gold[q] == majority for q, _ in qs)
    # the best a user-blind reader of the text can do: the candidate that is most often gold overall
    prior = Counter(it[td.task.target_field] for u in td.test_users for it in u.profile)
    blind = sum(max(man["queries"][q]["candidates"], key=lambda c: prior[c]) == gold[q] for q, _ in qs)
    per_user = sum(gold[q] == Counter(it[td.task.target_field] for it in u.profile).most_common(1)[0][0] for q, u in qs)
    n = len(qs)
    assert oracle == n
    assert maj / n < 0.25
    assert blind / n < 0.65
    assert oracle / n - per_user / n > 0.3
    assert all(len(man["queries"][q]["candidates"]) in (2, 3) for q, _ in qs)


def test_generated_headline_styles_differ(tmp_path):
    generate("news_headline", str(tmp_path), num_users=12, history_per_user=5, queries_per_user=2, num_other_users=0, seed=1)
    man = json.load(open(tmp_path / "news_headline" / "manifest.json"))
    styles = {json.dumps(v["style"], sort_keys=True) for v in man["users"].values()}
    assert len(styles) >= 8
    td = load_task_data(str(tmp_path), "news_headline")
    for u in td.test_users:
        st = man["users"][u.user_id]["style"]
        for it in u.profile:
            if st["opener"]:
                assert it["title"].startswith(st["opener"])
            assert it["title"].endswith("?") == st["question"]


def test_fingerprint_follows_content_not_place_or_time(tmp_path):
    from perfit.data import data_fingerprint

    a = tmp_path / "a" / "user_others.json"
    a.parent.mkdir()
    a.write_text('[{"user_id": "u1"}]')
    fp = data_fingerprint([str(a)])
    b = tmp_path / "b" / "user_others.json"  # the same data downloaded again elsewhere, newer mtime
    b.parent.mkdir()
    shutil.copyfile(a, b)
    os.utime(b, ns=(a.stat().st_mtime_ns + 10**9,) * 2)
    assert data_fingerprint([str(b)]) == fp
    b.write_text('[{"user_id": "u2"}]')  # same size, other content
    os.utime(b, ns=(a.stat().st_mtime_ns + 2 * 10**9,) * 2)
    assert data_fingerprint([str(b)]) != fp
