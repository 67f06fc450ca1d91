import json
import os
import sqlite3
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save

from perfit.data import write_json_atomic
from perfit.errors import RunStateError
from perfit.method.shifts import Shifter
from perfit.store import UserStore, save_safetensors_atomic


def _tensors(sh, users):
    return {u: sh.user_state(k) for k, u in enumerate(users)}


def test_user_ids_are_data_never_paths(tmp_path):
    ids = ["../../etc/passwd", "a/b", "", "C:\\x", "ünïcode user", "x" * 500, "'; DROP TABLE users; --"]
    sh = Shifter(16, [0, 1], 2, 3, num_users=len(ids), seed=0)
    store = UserStore(str(tmp_path / "users.sqlite"), {"key": "k"})
    store.put_many(_tensors(sh, ids))
    assert {f for f in os.listdir(tmp_path)} <= {"users.sqlite", "users.sqlite-wal", "users.sqlite-shm"}
    again = UserStore(str(tmp_path / "users.sqlite"))
    assert again.users() == ids and len(again) == len(ids)
    fresh = Shifter(16, [0, 1], 2, 3, num_users=len(ids), seed=9)
    for k, u in enumerate(ids):
        fresh.load_user_state(k, again.get(u))
    for l in sh.layers:
        for n, p in sh.personal[str(l)].named_parameters():
            assert torch.equal(p, dict(fresh.personal[str(l)].named_parameters())[n])
    raw = 2 * (2 * 16 * 3 + 3) * 4
    assert raw < again.bytes_per_user() < raw + 600  # the tensors plus the safetensors header (~75 bytes a tensor)


def test_store_refuses_another_key_and_missing_users(tmp_path):
    UserStore(str(tmp_path / "s.sqlite"), {"key": "a", "settings": {"rank": 4}})
    with pytest.raises(RunStateError, match="rank: 4 vs 8"):
        UserStore(str(tmp_path / "s.sqlite"), {"key": "b", "settings": {"rank": 8}})
    with pytest.raises(KeyError, match="'nobody' is not in the store"):
        UserStore(str(tmp_path / "s.sqlite")).get("nobody")
    with pytest.raises(RunStateError, match="not a user store"):
        UserStore(str(tmp_path / "nothing.sqlite"))


def test_delete_removes_the_row_and_its_record(tmp_path):
    sh = Shifter(16, [0], 2, 2, num_users=2)
    store = UserStore(str(tmp_path / "s.sqlite"), {"key": "k"})
    store.put_many(_tensors(sh, ["a", "b"]), {"a": {"examples": 3}})
    t0 = time.time()
    assert store.entry("a")["examples"] == 3 and t0 - 60 < store.entry("a")["stored_at"] <= t0
    assert store.delete("a") is True and store.delete("a") is False
    assert "a" not in UserStore(str(tmp_path / "s.sqlite")) and set(store.entries()) == {"b"}
    with sqlite3.connect(tmp_path / "s.sqlite") as db:  # nothing of the user is left in the file's tables
        assert db.execute("SELECT COUNT(*) FROM users WHERE user_id = 'a'").fetchone()[0] == 0


_WRITER = """
import sys, torch
from perfit.store import UserStore
store = UserStore(sys.argv[1], {"key": "k"})
users = sys.argv[2].split(",")
store.put_many({u: {"w": torch.full((64,), float(i))} for i, u in enumerate(users)}, {u: {"n": 1} for u in users})
"""


def _writer(path, users, env=None):
    return subprocess.Popen([sys.executable, "-c", _WRITER, path, ",".join(users)], env=(os.environ | (env or {})),
                            stderr=subprocess.PIPE, text=True)


def test_a_group_is_written_whole_or_not_at_all(tmp_path):
    """A writer killed (SIGKILL) in the middle of writing a group leaves none of it; the store stays valid."""
    path = str(tmp_path / "s.sqlite")
    UserStore(path, {"key": "k"}).put_many({"old": {"w": torch.zeros(64)}})
    p = _writer(path, ["a", "b", "c"], {"PERFIT_FAULT": "store.mid_write"})
    assert p.wait(60) == -9
    store = UserStore(path)
    assert store.users() == ["old"] and store.verify() == []
    assert _writer(path, ["a", "b", "c"]).wait(60) == 0
    assert UserStore(path).users() == ["old", "a", "b", "c"]


def test_two_writers_at_once_both_land(tmp_path):
    path = str(tmp_path / "s.sqlite")
    UserStore(path, {"key": "k"})
    procs = [_writer(path, [f"p{k}-{i}" for i in range(50)]) for k in range(2)]
    assert [p.wait(120) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    store = UserStore(path)
    assert len(store) == 100 and store.verify() == []


def test_export_import_round_trip_and_verify_finds_corruption(tmp_path):
    sh = Shifter(16, [0, 1], 2, 3, num_users=3, seed=0)
    store = UserStore(str(tmp_path / "a.sqlite"), {"key": "k", "settings": {"x": 1}})
    store.put_many(_tensors(sh, ["u1", "u2", "u3"]), {"u2": {"items": 5}})
    assert store.export(str(tmp_path / "out")) == 3
    back = UserStore.import_folder(str(tmp_path / "out"), str(tmp_path / "b.sqlite"))
    assert back.config == store.config and back.users() == ["u1", "u2", "u3"] and back.entry("u2")["items"] == 5
    assert all(torch.equal(back.get("u3")[k], store.get("u3")[k]) for k in store.get("u3"))
    with sqlite3.connect(tmp_path / "b.sqlite") as db:  # flip bytes of one stored shift behind the store's back
        blob = bytearray(db.execute("SELECT tensors FROM users WHERE user_id = 'u2'").fetchone()[0])
        blob[-3] ^= 0xFF
        db.execute("UPDATE users SET tensors = ? WHERE user_id = 'u2'", (bytes(blob),))
    problems = UserStore(str(tmp_path / "b.sqlite")).verify()
    assert len(problems) == 1 and "user 'u2': checksum mismatch" in problems[0]


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """mkstemp makes 0600 files; results and shifts are written with the mode a plain open() gives."""
    mask = os.umask(0o022)
    try:
        write_json_atomic(str(tmp_path / "r.json"), {"a": 1})
        save_safetensors_atomic(str(tmp_path / "u.safetensors"), {"w": torch.zeros(2)}, {"user_id": "u"})
    finally:
        os.umask(mask)
    for f in ("r.json", "u.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / f).st_mode) == 0o644


def test_store_commands_and_moving_a_store_between_runs(finished_run, tmp_path, capsys):
    """ls, show, verify; a store exported (users.safetensors, perfit.method.io's format) and imported into a run with
    none answers as before; an import never goes over a store."""
    import shutil

    from perfit import PerFitModel
    from perfit.cli import main

    _, res = finished_run
    run = str(tmp_path / "run")
    shutil.copytree(res["run_dir"], run)
    assert main(["store", "ls", "--run_dir", run]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["user_id"] for r in listed] == ["u0000", "u0001", "u0002"]
    store = UserStore(os.path.join(run, "users.sqlite"))
    assert [r["bytes"] for r in listed] == [len(save(store.get(u))) for u in store.users()]
    assert main(["store", "show", "--run_dir", run, "--user_id", "u0001"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["items"] == 4 and shown["tensors"]["layer.1.weight"] == [2, 64]
    assert main(["store", "verify", "--run_dir", run]) == 0
    before = PerFitModel.from_run(run).generate(["u0001"], ["a film about dragons"])
    out = str(tmp_path / "exported")
    assert main(["store", "export", "--run_dir", run, "--to", out]) == 0
    assert sorted(os.listdir(out)) == ["users.safetensors"]
    for suffix in ("", "-wal", "-shm"):  # the run without its store
        if os.path.exists(os.path.join(run, "users.sqlite" + suffix)):
            os.unlink(os.path.join(run, "users.sqlite" + suffix))
    assert PerFitModel.from_run(run).generate(["u0001"], ["x"]).without_personal_shift == ["u0001"]
    capsys.readouterr()
    assert main(["store", "import", "--run_dir", run, "--from", out]) == 0
    assert json.loads(capsys.readouterr().out)["imported"] == 3
    assert list(PerFitModel.from_run(run).generate(["u0001"], ["a film about dragons"])) == list(before)
    assert main(["store", "import", "--run_dir", run, "--from", out]) == 2  # never over a store
    assert main(["store", "show", "--run_dir", run, "--user_id", "nobody"]) == 2


def test_a_failed_import_leaves_no_store(tmp_path):
    sh = Shifter(16, [0], 2, 2, num_users=2)
    store = UserStore(str(tmp_path / "a.sqlite"), {"key": "k"})
    store.put_many(_tensors(sh, ["u1", "u2"]))
    store.export(str(tmp_path / "out"))
    (tmp_path / "out" / "users.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RunStateError, match="not a folder of users' shifts"):
        UserStore.import_folder(str(tmp_path / "out"), str(tmp_path / "b.sqlite"))
    assert not [f for f in os.listdir(tmp_path) if f.startswith("b.sqlite")]  # nothing half-built left behind


def test_versions_are_never_reused_and_a_replaced_shift_stays_loadable_for_a_while(tmp_path, monkeypatch):
    """Each write of a shift gets a new version id, even for the same tensors; a replaced version stays readable
    (for requests admitted before the retrain) until RETIRED_KEEP_S has passed; an erasure removes every version."""
    import perfit.store as st

    path = str(tmp_path / "s.sqlite")
    sh = Shifter(16, [0], 2, 2, num_users=2, seed=0)
    store = UserStore(path, {"key": "k"})
    store.put_many(_tensors(sh, ["a", "b"]))
    v1 = store.version("a")
    first = store.get("a")
    frozen = time.time()  # the retirement and the next write in one millisecond (one run in ten in the full suite)
    monkeypatch.setattr(st.time, "time", lambda: frozen)
    store.put_many({"a": first})  # the very same tensors again
    v2 = store.version("a")
    assert v1 != v2 and v1.split(".")[0] == v2.split(".")[0]  # same content hash, another write
    assert store.versions(["a", "b", "nobody"]) == {"a": v2, "b": store.version("b")}
    assert all(torch.equal(store.get_version("a", v1)[k], first[k]) for k in first)  # retired, still loadable
    assert store.get_version("a", "no-such-version") is None and store.get_version("b", v1) is None
    monkeypatch.setattr(st, "RETIRED_KEEP_S", 0.0)
    store.put_many({"b": store.get("b")})  # the next write drops what was retired as long ago as that, or longer
    monkeypatch.undo()
    assert store.get_version("a", v1) is None and store.get_version("a", v2) is not None
    store.put_many({"a": first})
    assert store.delete("a") is True
    with sqlite3.connect(path) as db:  # nothing of the user is left in any table
        for table in ("users", "retired", "jobs"):
            assert db.execute(f"SELECT COUNT(*) FROM {table} WHERE user_id = 'a'").fetchone()[0] == 0, table


def test_jobs_are_stored_only_while_current_and_leave_with_their_commit(tmp_path):
    path = str(tmp_path / "s.sqlite")
    sh = Shifter(16, [0], 2, 2, num_users=3, seed=0)
    store = UserStore(path, {"key": "k"})
    items = [{"id": "1", "x": "y"}]
    ja, jb, jc = store.enqueue("a", items), store.enqueue("b", items), store.enqueue("c", items)
    assert UserStore(path).pending_jobs() == [("a", ja), ("b", jb), ("c", jc)]  # committed: another connection sees them
    assert store.take_jobs({"a": ja, "b": jb, "c": jc}) == {"a": items, "b": items, "c": items}
    assert store.job("a")["status"] == "training" and store.job("a")["items"] == 1
    jb2 = store.enqueue("b", items * 2)  # b posted again while training: its first job is stale
    store.delete("c")  # c erased while training
    stored = store.put_many(_tensors(sh, ["a", "b", "c"]), jobs={"a": ja, "b": jb, "c": jc})
    assert stored == ["a"] and store.users() == ["a"] and store.job("a") is None
    assert store.pending_jobs() == [("b", jb2)] and store.job("b")["items"] == 2 and store.job("c") is None
    assert store.take_jobs({"b": jb}) == {}  # a stale job id takes nothing


def test_failed_jobs_keep_their_error_not_their_items_and_are_bounded(tmp_path, monkeypatch):
    import perfit.store as st

    monkeypatch.setattr(st, "FAILED_JOBS_KEPT", 2)
    path = str(tmp_path / "s.sqlite")
    store = UserStore(path, {"key": "k"})
    for u in ("a", "b", "c"):
        store.fail_jobs({u: store.enqueue(u, [{"id": "1", "secret": "text"}])}, f"boom {u}")
    assert store.job("a") is None and store.job("c")["error"] == "boom c" and store.job("c")["status"] == "failed"
    assert store.pending_jobs() == []
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM jobs WHERE items IS NOT NULL").fetchone()[0] == 0
    assert store.delete("c") is False  # a failed job is not "something stored" about a user, and goes anyway
    assert store.job("c") is None


def test_a_store_made_with_other_settings_names_the_setting(finished_run, tmp_path):
    """A run dir's store refused for another --patience says so, not "same settings, other data" (the settings a
    store records are derived from the fields declared to affect the users' shifts, not a hand-kept list)."""
    import dataclasses
    import shutil

    from perfit import PerFitModel
    from perfit.backbone import load_backbone
    from perfit.rundir import load_run_config

    _, res = finished_run
    run = str(tmp_path / "run")
    shutil.copytree(res["run_dir"], run)
    cfg = load_run_config(run)
    other = dataclasses.replace(cfg, patience=cfg.patience + 1)
    pm = PerFitModel(other, load_backbone(cfg.model_path, cfg.dtype, cfg.cuda_device, cfg.model_name, device="cpu"), run)
    with pytest.raises(RunStateError, match=rf"patience: {cfg.patience} vs {cfg.patience + 1}"):
        pm.open_store()
