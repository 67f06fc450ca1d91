"""Shifts, their attachment, and training. Equality tests run the tiny model in float64, where the paths that must
agree in principle (caches, shared prefixes, batched users) agree to ~1e-12, so tolerances of 1e-9 separate a real
difference from rounding with a margin of a thousand either way."""
import copy
import os

import pytest
import torch

from perfit.backbone import check_layers
from perfit.testing import tiny_llama
from perfit.batching import make_batch, shared_prompt_prefix, tokenize_examples
from perfit.errors import ConfigError
from perfit.prompts import Example
from perfit.method.shifts import LowRankShift, Shifter, ShiftState, parse_positions, position_index, probe_outputs
from perfit.train import MaskedAdamW, train_shifts
from perfit.train.caches import compute_frozen_prefix, compute_lower_cache
from perfit.train.forward import forward_loss

from conftest import model64

EXACT = dict(rtol=1e-9, atol=1e-12)  # float64: paths equal in principle


def _model64(arch="llama", **kw):
    return model64(arch, **kw)


def test_shift_equals_formula_on_random_tensors():
    g = torch.Generator().manual_seed(0)
    m = LowRankShift(3, 16, 4, g).double()
    h = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    which = torch.tensor([2, 0, 2])
    got = m.delta(h, which)
    assert got.dtype == torch.float64
    for b in range(3):
        R, W, bias = m.rotation()[which[b]], m.weight[which[b]], m.bias[which[b]]
        want = (h[b] @ W.T + bias - h[b] @ R.T) @ R  # R^T (W h + b - R h), row-vector form
        torch.testing.assert_close(got[b], want, **EXACT)
    assert m.num_parameters_per_module() == 2 * 16 * 4 + 4


def test_rotation_orthonormal_and_fixed_point():
    m = LowRankShift(4, 32, 8, torch.Generator().manual_seed(1)).double()
    R = m.rotation()
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(8, dtype=torch.float64).expand(4, 8, 8), **EXACT)
    with torch.no_grad():
        m.rotate_raw.copy_(R.transpose(1, 2))
    torch.testing.assert_close(m.rotation(), R, **EXACT)


def test_positions_parse_and_cap():
    assert parse_positions("f7+l7") == (7, 7) and parse_positions("l7") == (0, 7) and parse_positions("f3") == (3, 0)
    for bad in ("", "x", "f7l7", "f0+l0"):
        with pytest.raises(ValueError):
            parse_positions(bad)
    idx, valid = position_index([20, 6], [0, 14], 7, 7)
    assert idx[0][valid[0]].tolist() == list(range(7)) + list(range(13, 20))
    assert idx[1][valid[1]].tolist() == [14, 15, 16, 17, 18, 19]  # capped at len//2 = 3 each, shifted by the padding
    idx, valid = position_index([20], [-12], 0, 3)  # a prefix of 12 tokens runs separately: suffix coordinates
    assert idx[0][valid[0]].tolist() == [5, 6, 7]


def test_positions_follow_real_tokens_under_left_and_right_padding():
    seqs = [[5] * 10, [6] * 4]
    b = make_batch(seqs, [10, 4], [0, 1], pad_id=0, first=2, last=1)
    assert b.offsets == [0, 6]
    assert b.shift_index[1][b.shift_valid[1]].tolist() == [6, 7, 9]
    assert b.position_ids[1, 6:].tolist() == [0, 1, 2, 3]
    ridx, rvalid = position_index([10, 4], [0, 0], 2, 1)  # right padding: offsets are 0
    assert ridx[1][rvalid[1]].tolist() == [0, 1, 3]


def _ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (1, n), generator=g)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_attach_detach_bit_identical_and_position_local(arch):
    model = tiny_llama(arch=arch, vocab=260)
    ids = _ids(12, 0)
    base = model(input_ids=ids).logits.clone()
    sh = Shifter(64, [1, 2], 4, 2, num_users=2, seed=0)
    with sh.attached(model):
        assert torch.equal(model(input_ids=ids).logits, base)  # hooks with no state do nothing
        idx, valid = position_index([12], [0], 0, 2)
        with sh.active(ShiftState(idx, valid, torch.tensor([1]), 12)):
            shifted = model(input_ids=ids).logits
    assert torch.equal(shifted[:, :10], base[:, :10])  # causal: positions before the shift are untouched
    assert (shifted[:, 10:] - base[:, 10:]).abs().max() > 1e-3
    assert torch.equal(model(input_ids=ids).logits, base)
    assert all(not p.requires_grad for p in model.parameters())


def test_hooks_never_outlive_an_exception(llama):
    ids = _ids(12, 1)
    base = llama(input_ids=ids).logits.clone()
    sh = Shifter(64, [1, 2], 4, 2, num_users=1, seed=0)
    idx, valid = position_index([12], [0], 2, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with sh.attached(llama), sh.active(ShiftState(idx, valid, torch.tensor([0]), 12)):
            raise RuntimeError("boom")
    assert sh.state is None
    assert torch.equal(llama(input_ids=ids).logits, base)
    assert all(not blk._forward_hooks for blk in llama.model.layers)


def test_layer_out_of_range_is_clear(llama):
    with pytest.raises(ConfigError, match=r"out of range: the model has 4 decoder layers \(0..3\)"):
        check_layers(llama, [2, 9])
    with pytest.raises(ValueError, match="out of range"):
        with Shifter(64, [7], 4, 2).attached(llama):
            pass


def _examples(tok, users=("a", "b", "c"), n=5, salt=""):
    ex = [Example(f"user {u} item {i}{salt} says what?", f" {'yes' if (i + len(u)) % 2 else 'no'}", u) for u in users for i in range(n)]
    return tokenize_examples(tok, ex, 256, {u: k for k, u in enumerate(users)})


def _instruction_examples(tok, users=("a", "b", "c"), n=5):
    """Examples opening with one long shared instruction, as real task prompts do (prompts of unequal lengths)."""
    ex = [Example(f"Answer yes or no to the question that follows. Question {u}{i * 7}{'?' * (i % 3)}: is it so? answer:",
                  f" {'yes' if (i + len(u)) % 2 else 'no'}", u) for u in users for i in range(n)]
    return tokenize_examples(tok, ex, 256, {u: k for k, u in enumerate(users)})


def _shifter64(users, seed=0, init="loreft"):
    sh = Shifter(64, [1, 2], 4, 2, num_users=users, seed=seed, init=init).double()
    sh.set_all_personal(Shifter(64, [1, 2], 4, 2, num_users=1, seed=seed, init=init))  # every user starts from one P0
    return sh


def _grads(model, sh, rows, first, last, **kw):
    """Loss, per-row loss sums and the gradient of every shift parameter for one forward pass."""
    for p in sh.parameters():
        p.requires_grad_(True)
        p.grad = None
    tokens = {}
    for r in rows:
        tokens[r.module] = tokens.get(r.module, 0) + len(r.ids) - r.prompt_len
    with sh.attached(model):
        loss, row_sums, _ = forward_loss(model, sh, rows, [1.0 / tokens[r.module] for r in rows], 2, first, last,
                                         low_layer=1, **kw)
        loss.backward()
    return loss.detach(), row_sums, {n: p.grad.clone() for n, p in sh.named_parameters()}


def _assert_same_grads(got, ref, what: str) -> None:
    """The same loss, per-row loss sums and gradient of every shift parameter (`_grads` results)."""
    torch.testing.assert_close(got[0], ref[0], **EXACT, msg=what)
    torch.testing.assert_close(got[1], ref[1], **EXACT, msg=what)
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], **EXACT, msg=f"{what}: {n}")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_every_forward_path_gives_the_same_gradients(tok, arch):
    """Lower-layer cache, shared-prefix passes (once per user) and the frozen-prefix cache against the plain full
    forward of every row: the same loss and the same gradient of every shift parameter, in float64."""
    model = _model64(arch)
    rows = _instruction_examples(tok)[:2] + _instruction_examples(tok)[5:8] + _instruction_examples(tok)[12:14]
    assert shared_prompt_prefix([r.ids[: r.prompt_len] for r in rows], 2, 2) > 40
    lower = compute_lower_cache(model, rows, 1, 2, 1 << 30)
    ref = _grads(model, _shifter64(3), rows, 2, 2, lower=None, share_prefix=False)
    for name, kw in {"lower cache": dict(lower=lower, share_prefix=False),
                     "shared prefix": dict(lower=None, share_prefix=True),
                     "shared prefix + lower cache": dict(lower=lower, share_prefix=True)}.items():
        _assert_same_grads(_grads(model, _shifter64(3), rows, 2, 2, **kw), ref, name)
    # last positions only: the frozen-prefix cache (the tiny Gemma 3's window, 8 columns, holds none of these rows:
    # it runs whole passes)
    frozen = compute_frozen_prefix(model, rows, 1, 2, 2, 1 << 30)
    assert (frozen is None) == (arch == "gemma3")
    if frozen is not None:
        ref0 = _grads(model, _shifter64(3), rows, 0, 2, lower=None, share_prefix=False)
        _assert_same_grads(_grads(model, _shifter64(3), rows, 0, 2, lower=None, frozen=frozen), ref0, "frozen prefix")
    assert any(g.abs().max() > 1e-6 for g in ref[2].values())  # the gradients compared are not all zero


@pytest.mark.parametrize("short", [0, 1])
def test_a_sliding_window_model_splices_the_rows_its_window_holds(tok, monkeypatch, short):
    """Seen: any sliding window (Gemma 3 270M's is 512 columns) made every pass of the model a whole one, though its
    prompts are a fifth as long. Rows whose spliced pass fits the window (prefix, padding and own tokens) share the
    instruction and the frozen prefix with the loss and gradients of whole passes, here at the window's very edge
    (short=0); one column short of it (short=1) they run whole, and still agree."""
    import perfit.train.forward as fwd
    from perfit.batching import frozen_prefix_columns

    rows = _instruction_examples(tok)[:2] + _instruction_examples(tok)[5:8] + _instruction_examples(tok)[12:14]
    wide = max(len(r.ids) for r in rows)
    assert min(len(r.ids) for r in rows) < wide  # rows of unequal lengths: a padding gap in every shorter row
    spliced = []
    real = fwd._forward_shared_prefix
    monkeypatch.setattr(fwd, "_forward_shared_prefix", lambda *a, **k: spliced.append(1) or real(*a, **k))
    model = _model64("gemma3", config={"sliding_window": wide - short})
    ref = _grads(model, _shifter64(3), rows, 2, 2, lower=None, share_prefix=False)
    got = _grads(model, _shifter64(3), rows, 2, 2, lower=None, share_prefix=True)
    assert bool(spliced) == (short == 0)
    _assert_same_grads(got, ref, "shared prefix")
    cols = frozen_prefix_columns([(r.prompt_len, len(r.ids) - r.prompt_len) for r in rows], 2)
    model = _model64("gemma3", config={"sliding_window": cols - short})
    frozen = compute_frozen_prefix(model, rows, 1, 2, 2, 1 << 30)
    assert (frozen is None) == bool(short)
    if frozen is not None:
        ref0 = _grads(model, _shifter64(3), rows, 0, 2, lower=None, share_prefix=False)
        _assert_same_grads(_grads(model, _shifter64(3), rows, 0, 2, lower=None, frozen=frozen), ref0, "frozen prefix")


def _train(model, tok, ex, users, epochs=2, first=2, collective=False, init="loreft", **kw):
    sh = _shifter64(users, init=init)
    with sh.attached(model):
        st = train_shifts(model, sh, ex, epochs=epochs, batch_size=2, lr=1e-2, train_collective=collective, pad_id=2,
                          first=first, last=2, seed=0, max_rows=4, **kw)
    return sh, st


PROBES = torch.randn(5, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _assert_same_shifts(a: Shifter, b: Shifter, tol=EXACT, users=None):
    pa, pb = probe_outputs(a, PROBES), probe_outputs(b, PROBES)
    for k in pa:
        x, y = (pa[k], pb[k]) if users is None or not k.startswith("personal") else (pa[k][users], pb[k][users])
        torch.testing.assert_close(x, y, **tol, msg=k)


@pytest.mark.parametrize("first", [2, 0])
def test_cached_training_equals_uncached(tok, first):
    """Whole training runs (two epochs, collective and personal) through the caches and prefix sharing against no
    caching at all: the same effective shifts and the same epoch losses."""
    model = _model64()
    ex = _instruction_examples(tok) + _examples(tok, n=2)
    for e in ex:
        e.module = {"a": 0, "b": 1, "c": 2}[e.key]
    a, sa = _train(model, tok, ex, 3, first=first, collective=True, cache_max_bytes=1 << 30)
    b, sb = _train(model, tok, ex, 3, first=first, collective=True, cache_max_bytes=0, share_prefix=False, frozen_prefix=False)
    assert sa.cached_lower_layers and not sb.cached_lower_layers
    assert sa.cached_frozen_prefix == (first == 0)
    assert sa.epoch_losses == pytest.approx(sb.epoch_losses, rel=1e-10)
    _assert_same_shifts(a, b)
    assert sa.epoch_losses[-1] < sa.epoch_losses[0]


def test_disk_cache_equals_uncached_and_leaves_nothing(tok, tmp_path):
    """Over the memory bound the frozen states go to a memory-mapped file (unlinked at once); training is unchanged.
    Over both bounds they are recomputed."""
    model = _model64()
    ex = _instruction_examples(tok)
    disk = str(tmp_path / "c")
    a, sa = _train(model, tok, ex, 3, cache_max_bytes=0, disk_cache_dir=disk, disk_cache_max_bytes=1 << 30, share_prefix=False)
    b, sb = _train(model, tok, ex, 3, cache_max_bytes=0, share_prefix=False)
    assert sa.cached_lower_layers and sa.cached_on_disk and not sb.cached_lower_layers
    assert os.listdir(disk) == []
    assert sa.epoch_losses == pytest.approx(sb.epoch_losses, rel=1e-10)
    _assert_same_shifts(a, b)


def test_batched_users_equal_one_user_loop(tok):
    """Users trained together (unequal histories, so they finish at different steps) end exactly where each trained
    alone ends, and each user's reported epoch losses are its own."""
    model = _model64()
    ex = _examples(tok, users=("a", "b", "c"), n=5) + _examples(tok, users=("c",), n=3, salt="x")
    for e in ex:
        e.module = {"a": 0, "b": 1, "c": 2}[e.key]
    joint, sj = _train(model, tok, ex, 3, epochs=3)
    for k, u in enumerate("abc"):
        mine = [copy.copy(e) for e in ex if e.key == u]
        for e in mine:
            e.module = 0
        alone, sa = _train(model, tok, mine, 1, epochs=3)
        pj, pa = probe_outputs(joint, PROBES), probe_outputs(alone, PROBES)
        for l in joint.layers:
            torch.testing.assert_close(pj[f"personal.{l}"][k], pa[f"personal.{l}"][0], **EXACT, msg=f"{u} layer {l}")
        assert sj.user_epoch_losses[k] == pytest.approx(sa.user_epoch_losses[0], rel=1e-10)
        assert sa.user_epoch_losses[0] == pytest.approx(sa.epoch_losses, rel=1e-10)


def test_users_data_never_mix(tok):
    model = _model64()
    ex = _examples(tok)
    changed = _examples(tok, salt=" CHANGED")
    changed = [c if c.key == "b" else e for e, c in zip(ex, changed)]  # only user b's data differs
    x, _ = _train(model, tok, ex, 3)
    y, _ = _train(model, tok, changed, 3)
    _assert_same_shifts(x, y, users=[0, 2])  # a and c: unchanged to rounding
    px, py = probe_outputs(x, PROBES), probe_outputs(y, PROBES)
    assert all((px[f"personal.{l}"][1] - py[f"personal.{l}"][1]).abs().max() > 1e-4 for l in x.layers)


def test_training_keeps_rotation_orthonormal_and_moves_it(tok, llama):
    ex = _examples(tok, users=("a",), n=6)
    sh = Shifter(64, [1, 2], 4, 2, num_users=1, seed=0)
    before = probe_outputs(sh, PROBES.float())
    with sh.attached(llama):
        st = train_shifts(llama, sh, ex, epochs=6, batch_size=2, lr=1e-2, train_collective=True, pad_id=2, first=2, last=2)
    assert st.epoch_losses[-1] < st.epoch_losses[0] - 0.1
    for m in list(sh.personal.values()) + list(sh.collective.values()):
        R = m.rotation()
        torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(R.shape[1]).expand_as(R @ R.transpose(1, 2)), atol=1e-5, rtol=0)
    after = probe_outputs(sh, PROBES.float())
    assert all((after[k] - before[k]).abs().max() > 1e-3 for k in after)


def test_masked_adamw_matches_torch_adamw_and_skips_inactive():
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2, 3, generator=g, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach()[0:1].clone())
    ours, ref = MaskedAdamW([p], lr=0.1), torch.optim.AdamW([q], lr=0.1, weight_decay=0.0)
    before_row1 = p.detach()[1].clone()
    for step in range(3):
        grad = torch.randn(1, 3, generator=g, dtype=torch.float64)
        p.grad = torch.cat([grad, torch.zeros(1, 3, dtype=torch.float64)])
        q.grad = grad.clone()
        ours.step(torch.tensor([True, False]))
        ref.step()
        torch.testing.assert_close(p.detach()[0:1], q.detach(), rtol=1e-13, atol=1e-15)
    assert torch.equal(p.detach()[1], before_row1)


def test_loss_only_on_target_tokens(tok):
    model = _model64()
    ex = _examples(tok, users=("a",), n=2)
    sh = Shifter(64, [1], 4, 2).double()
    with sh.attached(model), torch.no_grad():
        loss, row_sums, n = forward_loss(model, sh, ex[:1], [1.0], 2, 2, 2, None, 1)
        ids = torch.tensor([ex[0].ids])
        bare = model(input_ids=ids).logits[0, ex[0].prompt_len - 1: -1]  # no state: the hooks do nothing
    want = torch.nn.functional.cross_entropy(bare, ids[0, ex[0].prompt_len:], reduction="sum")
    assert n == [len(ex[0].ids) - ex[0].prompt_len] and ex[0].ids[-1] == tok.eos_token_id
    # the shifted loss differs from the bare model's, the bare one is recovered with a zero-init shift
    assert abs(float(loss) - float(want)) > 1e-4
    zero = Shifter(64, [1], 4, 2, init="zero").double()
    with zero.attached(model), torch.no_grad():
        loss0, _, _ = forward_loss(model, zero, ex[:1], [1.0], 2, 2, 2, None, 1)
    torch.testing.assert_close(loss0, want, **EXACT)
    torch.testing.assert_close(row_sums.sum(), loss.double(), **EXACT)


def test_zero_init_starts_as_the_identity_and_still_learns(tok, llama):
    """shift_init='zero' (W = R, b = 0): the shifted model equals the bare one until the first step, then trains."""
    ids = torch.tensor([tokenize_examples(tok, [Example("a prompt here", " x", "a")], 64)[0].ids])
    bare = llama(input_ids=ids).logits
    sh = Shifter(64, [1, 2], 4, 2, num_users=2, seed=1, init="zero")
    with sh.attached(llama), sh.active(ShiftState(torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool),
                                                  torch.tensor([1]), ids.shape[1])):
        assert torch.equal(llama(input_ids=ids).logits, bare)
    ex = _instruction_examples(tok)
    sh = Shifter(64, [1, 2], 4, 2, num_users=3, seed=1, init="zero")
    with sh.attached(llama):
        st = train_shifts(llama, sh, ex, epochs=3, batch_size=2, lr=1e-2, train_collective=True, pad_id=2, first=2, last=2)
    assert st.epoch_losses[-1] < st.epoch_losses[0]
    with pytest.raises(ValueError, match="shift init"):
        Shifter(64, [1], 4, 2, init="ones")


def test_early_stopping_keeps_each_users_best_epoch(tok):
    """User a's validation items contradict its training items (its validation loss rises as it trains), user b's
    agree: a stops early and keeps its best epoch, b trains to the end; each kept shift equals a plain run of exactly
    that many epochs, and b's training is not changed by a's stopping."""
    model = _model64()
    train = [Example(f"question {u} {i}: is it so? answer:", " yes", u) for u in "ab" for i in range(6)]
    # shifts that start as the identity; a's validation answers are blank lines: its loss falls, then rises (best: epoch 4)
    val = [Example(f"check {u} {i}: is it so? answer:", "\n\n\n" if u == "a" else " yes", u) for u in "ab" for i in range(3)]
    module_of = {"a": 0, "b": 1}
    ex, vx = tokenize_examples(tok, train, 256, module_of), tokenize_examples(tok, val, 256, module_of)
    sh, st = _train(model, tok, ex, 2, epochs=6, init="zero", val_examples=vx, patience=1)
    hist, best = st.user_val_losses, st.user_best_epoch
    for u in (0, 1):
        assert best[u] == min(range(len(hist[u])), key=hist[u].__getitem__)
    assert best[1] == 6 and len(hist[1]) == 7  # b improved at every epoch and trained all 6
    assert 0 < best[0] < 6 and len(hist[0]) == best[0] + 2  # a stopped one epoch after its best (patience 1)
    for u, k in (("a", 0), ("b", 1)):
        mine = [copy.copy(e) for e in ex if e.key == u]
        for e in mine:
            e.module = 0
        if best[k] == 0:
            alone = _shifter64(1, init="zero")  # nothing trained: P0
        else:
            alone, _ = _train(model, tok, mine, 1, epochs=best[k], init="zero")
        pj, pa = probe_outputs(sh, PROBES), probe_outputs(alone, PROBES)
        for l in sh.layers:
            torch.testing.assert_close(pj[f"personal.{l}"][k], pa[f"personal.{l}"][0], **EXACT, msg=f"{u} layer {l}")
