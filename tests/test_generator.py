"""The shift generator (instant personalization) on tiny float64 models: an untrained generator is exactly stage 1,
its path through `personal_given` is the stored shift's path, instant+train is stage 2 from the generated shift, a
generated shift serves as a trained one, and no test user's data reaches its training."""
import dataclasses
import os

import pytest
import torch

from perfit import PerFitModel, pipeline
from perfit.backbone import load_backbone
from perfit.batching import tokenize_examples
from perfit.config import RunConfig
from perfit.method.generator import GeneratorSpec, ShiftGenerator, personal_weights, user_tensors
from perfit.rundir import GENERATOR, read_generator
from perfit.train import stages
from perfit.train.forward import forward_loss

from conftest import model64, run_cfg

EXACT = dict(rtol=0, atol=1e-10)
ITEMS = [{"id": str(i), "description": f"a film about {w}", "tag": t}
         for i, (w, t) in enumerate([("robots", "sci-fi"), ("wizards", "fantasy"), ("a heist", "action"),
                                     ("androids", "sci-fi"), ("a dragon", "fantasy")])]


@pytest.fixture
def pm64(tok, tmp_path):
    folder = str(tmp_path / "model")
    model64().save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = RunConfig(task_name="movie_tagging", model_path=folder, output_dir=str(tmp_path), intervene_layer="1;2",
                    low_rank_dimension=4, user_low_rank_dimension=2, max_epoch=4, stage1_epochs=1, batch_size=2,
                    max_length=256, dtype="float64", lr=1e-2, user_lr=1e-2, preset="paper", gen_epochs=1,
                    gen_users_per_step=2, gen_targets=1, personalize="instant+train", warm_epochs=2, seed=3)
    pm = PerFitModel(cfg, load_backbone(folder, "float64", device="cpu"), str(tmp_path / "run"))
    pm.save_config()
    pm.fit_collective([pm.builder.history_example(it, "other") for it in ITEMS])
    return pm


def _random_head(gen: ShiftGenerator, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gen.head.weight.copy_(torch.randn(gen.head.weight.shape, generator=g, dtype=gen.head.weight.dtype) * 0.05)
        gen.head.bias.copy_(torch.randn(gen.head.bias.shape, generator=g, dtype=gen.head.bias.dtype) * 0.05)


def _untrained(pm) -> ShiftGenerator:
    spec = GeneratorSpec(pm.info.hidden_size, pm.cfg.layers, pm.cfg.user_low_rank_dimension, width=8)
    return ShiftGenerator(spec).double().eval()


def test_an_untrained_generator_gives_exactly_stage_1(pm64):
    pm64.set_generator(_untrained(pm64), {})
    rep = pm64.personalize({"u": ITEMS[:3]}, mode="instant")["u"]
    assert rep["mode"] == "instant" and rep["items"] == 3 and rep["epoch_losses"] == []
    p0 = pm64.collective.user_state(0)
    stored = pm64.store.get("u")
    assert stored.keys() == p0.keys()
    for k in p0:
        assert torch.equal(stored[k], p0[k]), k  # W0 + 0, b0 + 0: bit for bit
    q = ["description: robots in love", "description: a wizard's school"]
    assert list(pm64.generate(["u", "u"], q)) == list(pm64.generate(["u", "u"], q, variant="stage1"))


def test_the_generated_path_is_the_stored_shift_path(pm64):
    """The loss that trains the generator (its W, b given to the modules) equals the loss of the same shift loaded as
    a stored user's, and its gradient reaches the generator."""
    gen = _untrained(pm64)
    _random_head(gen)
    ex = tokenize_examples(pm64.tok, [pm64.builder.history_example(it, "x") for it in ITEMS], 256)
    z = torch.randn(2, gen.spec.feature_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    delta = gen(z)
    p0 = pm64.collective.user_state(0)
    rows = [type(e)(e.ids, e.prompt_len, k % 2, e.key) for k, e in enumerate(ex)]
    w = [1.0] * len(rows)
    sh = pm64.collective.spawn(2)
    with sh.attached(pm64.model), sh.personal_given(personal_weights(p0, delta)):
        got, per_row, _ = forward_loss(pm64.model, sh, rows, w, pm64.tok.pad_token_id, pm64.first, pm64.last, None, 1)
    got.backward()
    assert gen.head.weight.grad is not None and gen.head.weight.grad.abs().sum() > 0
    ref = pm64.collective.spawn(2)
    for k in range(2):
        ref.load_user_state(k, user_tensors(p0, delta, k))
    with ref.attached(pm64.model), torch.no_grad():
        _, want, _ = forward_loss(pm64.model, ref, rows, w, pm64.tok.pad_token_id, pm64.first, pm64.last, None, 1)
    torch.testing.assert_close(per_row, want, **EXACT)


def test_instant_plus_train_is_stage_2_from_the_generated_shift(pm64):
    gen = _untrained(pm64)
    _random_head(gen, seed=5)
    pm64.set_generator(gen, {})
    start = pm64.instant_shifts({"u": pm64.personal_examples("u", ITEMS)})["u"]
    rep = pm64.personalize({"u": ITEMS}, mode="instant+train")["u"]
    assert rep["mode"] == "instant+train" and len(rep["epoch_losses"]) == 2  # warm_epochs, not max_epoch
    got = pm64.store.get("u")
    # reference: plain stage 2 whose P0 is the generated shift, for warm_epochs
    ref_collective = pm64.collective.spawn(1)
    ref_collective.load_user_state(0, start)
    cfg = dataclasses.replace(pm64.cfg, max_epoch=2)
    tensors, _ = stages.train_group(pm64.model, pm64.tok, cfg, ref_collective, pm64.first, pm64.last,
                                    {"u": pm64.personal_examples("u", ITEMS)}, {"u": len(ITEMS)}, "ref", {})
    for k in got:
        torch.testing.assert_close(got[k], tensors["u"][k], **EXACT, msg=k)
    assert not torch.equal(got["layer.1.weight"], start["layer.1.weight"])  # it did train


def test_a_generator_learns_saves_and_reloads(pm64):
    per_user = {f"o{k}": [pm64.builder.history_example(it, f"o{k}") for it in ITEMS[k % 2:]] for k in range(8)}
    report = pm64.fit_generator(per_user)
    assert report["users_train"] + report["users_held_out"] == 8 and report["items"] == sum(map(len, per_user.values()))
    assert report["held_out_loss"][0] == report["held_out_loss_p0"]
    gen, meta = read_generator(os.path.join(pm64.run_dir, GENERATOR))
    assert meta["generator_key"] == pm64.keys()["generator"] and meta["report"] == report
    z = torch.randn(3, gen.spec.feature_dim, dtype=torch.float64)
    want, got = pm64.generator(z), gen.double()(z)
    for l in want:
        torch.testing.assert_close(got[l][0], want[l][0], **EXACT)
    again = PerFitModel.from_run(pm64.run_dir, device="cpu")
    assert again.generator is not None and again.load_generator_if_current()


def test_no_test_users_data_reaches_the_generator(tiny_model_dir, data, tmp_path, monkeypatch):
    """The generator learns from what stage 1 does (user_others.json, checked against the test users): no test user,
    query id or query text. A test user copied into user_others.json is refused before anything trains."""
    import json
    import shutil

    from perfit.data import DataError, load_task_data

    seen = {}

    def spy(self, per_user, desc="shift generator"):
        seen.update(per_user)
        self.set_generator(ShiftGenerator(GeneratorSpec(64, [1, 2], 2)), {})
        return {}

    monkeypatch.setattr(PerFitModel, "fit_generator", spy)
    cfg = run_cfg(tiny_model_dir, data, str(tmp_path / "out"), generator=1)
    exp = pipeline.prepare(cfg)
    pm = pipeline.open_model(exp)
    pipeline.ensure_stage1(exp, pm)
    pipeline.ensure_generator(exp, pm)
    td = load_task_data(data, "movie_tagging")
    tests = {u.user_id for u in td.test_users}
    queries = {q.input for u in td.test_users for q in u.query}
    others = {u.user_id for u in td.iter_others()}
    assert set(seen) == others and not set(seen) & tests
    assert not any(q in e.prompt for exs in seen.values() for e in exs for q in queries)
    # a test user's data in user_others.json: an error naming it, and no generator trained
    leak = str(tmp_path / "leak")
    shutil.copytree(data, leak)
    path = os.path.join(leak, "movie_tagging", "user_others.json")
    with open(path) as f:
        users = json.load(f)
    with open(os.path.join(leak, "movie_tagging", "user_top_100_history.json")) as f:
        users.append(json.load(f)[0])
    with open(path, "w") as f:
        json.dump(users, f)
    seen.clear()
    exp = pipeline.prepare(run_cfg(tiny_model_dir, leak, str(tmp_path / "out2"), generator=1))
    with pytest.raises(DataError, match="test user"):
        pipeline.ensure_stage1(exp, pipeline.open_model(exp))
    assert not seen


def test_instant_modes_need_a_generator(pm64):
    from perfit.errors import ConfigError, RunStateError

    with pytest.raises(RunStateError, match="no shift generator"):
        pm64.personalize({"u": ITEMS[:2]}, mode="instant")
    with pytest.raises(ConfigError, match="--personalize instant needs the shift generator"):
        RunConfig(personalize="instant", generator=0).resolved()
    c = RunConfig(personalize="instant").resolved()
    assert c.generator == 1 and c.num_other_users >= 100 and c.warm_epochs >= 1
    assert RunConfig().resolved().generator == 0 and RunConfig().resolved().num_other_users == 12


@pytest.mark.parametrize("trainer", ["inline", "process"])
def test_serving_an_instant_user_then_its_refined_shift(pm64, trainer):
    """A posted history is served its generated shift when the post returns (ready), then the refined one under a new
    version; each answer equals PerFitModel.complete with the shift version it names. Erasure removes both."""
    import time

    from perfit.generate import Completion
    from perfit.rundir import write_generator
    from perfit.serve.engine import Engine, GenRequest

    gen = _untrained(pm64)
    _random_head(gen, seed=7)
    write_generator(os.path.join(pm64.run_dir, GENERATOR), gen, {})
    pm = PerFitModel.from_run(pm64.run_dir, device="cpu", dtype="float64")
    engine = Engine(pm, max_wait_ms=0, mode="instant+train", trainer=trainer, trainer_nice=0)  # not starved by other jobs
    # the refinement waits until the instant shift is checked (inline: a gate on the worker's training turn; the
    # trainer process is started only by the post and needs seconds to load before it can take the job)
    import threading

    gate = threading.Event()
    train_turn = engine._training
    engine._training = lambda: gate.is_set() and train_turn()
    engine.start()
    ids = pm.prompt_ids(["description: robots in love"])[0]

    def ask():
        res = engine.generate(GenRequest("u", ids, pm.task.max_new_tokens, task=True)).result(timeout=60)
        fresh = PerFitModel.from_run(pm64.run_dir, device="cpu", dtype="float64")
        want = fresh.complete([Completion("u", ids, pm.task.max_new_tokens, True)])[0]
        assert (res["text"], res["shift_version"]) == (want.text, want.shift_version)
        return res

    try:
        st = engine.personalize("u", ITEMS)
        assert st["status"] == "ready" and st["mode"] == "instant" and st.get("refining") in ("queued", "training")
        instant = pm.instant_shifts({"u": pm.personal_examples("u", ITEMS)})["u"]
        for k, t in pm.store.get("u").items():
            assert torch.equal(t, instant[k]), k
        first = ask()
        assert first["personal_shift"] and first["shift_version"] == pm.store.version("u")
        gate.set()
        end = time.monotonic() + 120
        while engine.user_status("u").get("mode") != "instant+train" and time.monotonic() < end:
            if trainer == "inline":
                engine.generate(GenRequest("v", ids, 1, task=True)).result(timeout=60)  # turns of the worker
            time.sleep(0.1)
        st = engine.user_status("u")
        assert st["status"] == "ready" and st["mode"] == "instant+train" and "refining" not in st
        refined = ask()
        assert refined["shift_version"] != first["shift_version"]
        assert engine.forget("u").result(timeout=60) and "u" not in pm.store
    finally:
        engine.stop()
    if trainer == "process":
        assert engine._proc.poll() is not None  # the trainer stops with the server


def test_features_with_the_shared_instruction_run_once_equal_full_passes(pm64):
    """A new user's features (instruction once per chunk, rows spliced after it) equal those of full passes, the
    generator's training features, to float64 rounding; neither depends on the batch an item falls in."""
    from perfit.method.generator import item_features

    ex = tokenize_examples(pm64.tok, [pm64.builder.history_example(it, "x") for it in ITEMS], 256)
    spliced, none = item_features(pm64.model, ex, [1, 2], pm64.tok.pad_token_id)
    full, lower = item_features(pm64.model, ex, [1, 2], pm64.tok.pad_token_id, lower_layer=1)
    alone, _ = item_features(pm64.model, ex[2:3], [1, 2], pm64.tok.pad_token_id, chunk=1)
    assert none is None and len(lower) == len(ex) and spliced.shape == (len(ex), 2 * 2 * 64)
    torch.testing.assert_close(spliced, full, **EXACT)
    torch.testing.assert_close(alone[0], full[2], **EXACT)


def test_an_instant_server_restarted_makes_the_shifts_it_had_accepted(pm64):
    """A history accepted (in the store) by an instant server that died before generating it is generated by the next
    server at its start; nothing is trained."""
    import time

    from perfit.rundir import write_generator
    from perfit.serve.engine import Engine

    gen = _untrained(pm64)
    _random_head(gen, seed=9)
    write_generator(os.path.join(pm64.run_dir, GENERATOR), gen, {})
    pm = PerFitModel.from_run(pm64.run_dir, device="cpu", dtype="float64")
    pm.writable_store().enqueue("early", ITEMS[:3])  # what the dead server had accepted
    engine = Engine(pm, max_wait_ms=0, mode="instant", trainer="process")
    engine.start()
    try:
        end = time.monotonic() + 60
        while "early" not in pm.store and time.monotonic() < end:
            time.sleep(0.05)
        st = engine.user_status("early")
        assert st["status"] == "ready" and st["mode"] == "instant" and pm.store.job("early") is None
        want = pm.instant_shifts({"early": pm.personal_examples("early", ITEMS[:3])})["early"]
        assert all(torch.equal(t, want[k]) for k, t in pm.store.get("early").items())
    finally:
        engine.stop()
    assert engine._proc is None  # an instant server trains nothing


def test_a_trainer_process_killed_mid_training_is_restarted_and_the_user_trained(pm64, monkeypatch):
    """The trainer process dies (SIGKILL) as it starts a job: the server starts another, which takes the job from the
    store again; the user ends with the shift an uninterrupted training stores."""
    import time

    from perfit import faults
    from perfit.serve.engine import Engine

    pm = PerFitModel.from_run(pm64.run_dir, device="cpu", dtype="float64")
    monkeypatch.setenv(faults.ENV, "engine.train:1=kill")  # inherited by the first trainer process only
    engine = Engine(pm, max_wait_ms=0, mode="train", trainer="process", trainer_nice=0)
    engine.start()
    try:
        assert engine.personalize("u", ITEMS)["status"] in ("queued", "training")
        first = engine._proc
        end = time.monotonic() + 120
        while first.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert first.returncode == -9
        monkeypatch.delenv(faults.ENV)
        while engine.user_status("u")["status"] != "ready" and time.monotonic() < end:
            time.sleep(0.1)
        assert engine.user_status("u")["status"] == "ready" and engine._proc is not first
    finally:
        engine.stop()
    import shutil

    shutil.copytree(pm64.run_dir, pm64.run_dir + "-ref")
    ref = PerFitModel.from_run(pm64.run_dir + "-ref", device="cpu", dtype="float64")
    ref.forget("u")
    want = ref.personalize({"u": ITEMS}, mode="train")["u"]  # the same user id: the same data order
    got = pm.store.entry("u")
    assert got["epoch_losses"] == pytest.approx(want["epoch_losses"], abs=1e-12)


def test_a_generator_saved_with_the_shifts_loads_and_gives_the_same_shifts(pm64, tmp_path):
    """PerFitModel.save_pretrained writes the run's generator beside its shifts; from_pretrained gives it back with
    what made it, generating the same W and b from the same profile (float64, exact)."""
    from perfit.method import PerFitShifts

    gen = _untrained(pm64)
    _random_head(gen, seed=3)
    pm64.set_generator(gen, {"generator_key": "k1"})
    pm64.save_pretrained(str(tmp_path / "saved"), users=[])
    got = PerFitShifts.from_pretrained(str(tmp_path / "saved"))
    assert got.generator_meta == {"generator_key": "k1"} and got.users == {}
    x = torch.randn(3, gen.spec.feature_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want, have = gen(x), got.generator(x)
    for l in want:
        for a, b in zip(want[l], have[l]):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
