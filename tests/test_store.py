import json
import os
import stat

import pytest
import torch

from perfit.data import write_json_atomic
from perfit.errors import RunStateError
from perfit.shifts import Shifter
from perfit.store import UserStore, save_safetensors_atomic, user_file


def _tensors(sh, users):
    return {u: sh.user_state(k) for k, u in enumerate(users)}


def test_user_ids_are_data_never_paths(tmp_path):
    ids = ["../../etc/passwd", "a/b", "", "C:\\x", "ünïcode user", "x" * 500]
    sh = Shifter(16, [0, 1], 2, 3, num_users=len(ids), seed=0)
    store = UserStore(str(tmp_path / "users"), {"key": "k"})
    store.put_many(_tensors(sh, ids))
    assert sorted(os.listdir(tmp_path)) == ["users"]  # nothing escaped the store folder
    names = set(os.listdir(tmp_path / "users"))
    assert names == {"index.json", "store_config.json"} | {user_file(u) for u in ids}
    again = UserStore(str(tmp_path / "users"))
    fresh = Shifter(16, [0, 1], 2, 3, num_users=len(ids), seed=9)
    for k, u in enumerate(ids):
        fresh.load_user_state(k, again.get(u))
    for l in sh.layers:
        for n, p in sh.personal[str(l)].named_parameters():
            assert torch.equal(p, dict(fresh.personal[str(l)].named_parameters())[n])
    assert again.bytes_per_user() > 2 * (2 * 16 * 3 + 3) * 4


def test_store_refuses_another_key_and_missing_users(tmp_path):
    UserStore(str(tmp_path), {"key": "a", "settings": {"rank": 4}})
    with pytest.raises(RunStateError, match="rank: 4 vs 8"):
        UserStore(str(tmp_path), {"key": "b", "settings": {"rank": 8}})
    with pytest.raises(KeyError, match="'nobody' is not in the store"):
        UserStore(str(tmp_path)).get("nobody")
    with pytest.raises(RunStateError, match="not a user store"):
        UserStore(str(tmp_path / "nothing"))


def test_delete_removes_file_and_record(tmp_path):
    sh = Shifter(16, [0], 2, 2, num_users=2)
    store = UserStore(str(tmp_path), {"key": "k"})
    store.put_many(_tensors(sh, ["a", "b"]), {"a": {"examples": 3}})
    assert store.entry("a")["examples"] == 3 and "stored_at" in store.entry("a")
    assert store.delete("a") is True and store.delete("a") is False
    assert not os.path.exists(tmp_path / user_file("a"))
    assert set(json.load(open(tmp_path / "index.json"))) == {"b"} and "a" not in UserStore(str(tmp_path))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


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
