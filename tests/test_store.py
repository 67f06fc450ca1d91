import json
import os

import pytest
import torch

from perfit.shifts import Shifter
from perfit.store import UserStore, user_file


def test_user_ids_are_data_never_paths(tmp_path):
    ids = ["../../etc/passwd", "a/b", "", "C:\\x", "ünïcode user", "x" * 500]
    sh = Shifter(16, [0, 1], 2, 3, num_users=len(ids), seed=0)
    store = UserStore(str(tmp_path / "users"), {"k": 1})
    store.put_many(sh, {u: k for k, u in enumerate(ids)})
    assert sorted(os.listdir(tmp_path)) == ["users"]  # nothing escaped the store folder
    names = set(os.listdir(tmp_path / "users"))
    assert names == {"index.json", "store_config.json"} | {user_file(u) for u in ids}
    again = UserStore(str(tmp_path / "users"))
    fresh = Shifter(16, [0, 1], 2, 3, num_users=len(ids), seed=9)
    again.load_into(fresh, {u: k for k, u in enumerate(ids)})
    for l in sh.layers:
        for n, p in sh.personal[str(l)].named_parameters():
            assert torch.equal(p, dict(fresh.personal[str(l)].named_parameters())[n])
    assert again.bytes_per_user() > 2 * (2 * 16 * 3 + 3) * 4


def test_store_refuses_other_settings_and_missing_users(tmp_path):
    UserStore(str(tmp_path), {"rank": 4})
    with pytest.raises(ValueError, match="rank: 4 vs 8"):
        UserStore(str(tmp_path), {"rank": 8})
    with pytest.raises(KeyError, match="'nobody' is not in the store"):
        UserStore(str(tmp_path)).get("nobody")


def test_no_temporary_files_left_and_index_is_valid_json(tmp_path):
    sh = Shifter(16, [0], 2, 2, num_users=2)
    store = UserStore(str(tmp_path), {})
    store.put_many(sh, {"a": 0, "b": 1}, {"a": {"examples": 3}})
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    index = json.load(open(tmp_path / "index.json"))
    assert set(index) == {"a", "b"} and index["a"]["examples"] == 3


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """mkstemp makes 0600 files; results and shifts are written with the mode a plain open() gives."""
    import stat

    from perfit.data import write_json_atomic
    from perfit.store import save_safetensors_atomic

    mask = os.umask(0o022)
    try:
        write_json_atomic(str(tmp_path / "r.json"), {"a": 1})
        save_safetensors_atomic(str(tmp_path / "u.safetensors"), {"w": torch.zeros(2)}, {"user_id": "u"})
    finally:
        os.umask(mask)
    for f in ("r.json", "u.safetensors"):
        assert stat.S_IMODE(os.stat(tmp_path / f).st_mode) == 0o644
