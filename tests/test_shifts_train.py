import copy
import os

import pytest
import torch

from perfit.backbone import check_layers, tiny_llama
from perfit.prompts import Example
from perfit.shifts import LowRankShift, Shifter, ShiftState, parse_positions, position_index
from perfit.train import MaskedAdamW, tokenize_examples, train_shifts
from perfit.train.batching import make_batch
from perfit.train.loop import forward_loss, shared_prefix_len


def test_shift_equals_formula_on_random_tensors():
    torch.manual_seed(0)
    m = LowRankShift(3, 16, 4)
    h = torch.randn(3, 5, 16)
    which = torch.tensor([2, 0, 2])
    got = m.delta(h, which)
    for b in range(3):
        R, W, bias = m.rotation()[which[b]], m.weight[which[b]], m.bias[which[b]]
        want = (h[b] @ W.T + bias - h[b] @ R.T) @ R  # R^T (W h + b - R h), row-vector form
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5)
    assert m.num_parameters_per_module() == 2 * 16 * 4 + 4


def test_rotation_orthonormal_and_fixed_point():
    m = LowRankShift(4, 32, 8)
    R = m.rotation()
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(8).expand(4, 8, 8), atol=1e-5, rtol=0)
    with torch.no_grad():
        m.rotate_raw.copy_(R.transpose(1, 2))
    torch.testing.assert_close(m.rotation(), R, atol=1e-6, rtol=0)


def test_positions_parse_and_cap():
    assert parse_positions("f7+l7") == (7, 7) and parse_positions("l7") == (0, 7) and parse_positions("f3") == (3, 0)
    for bad in ("", "x", "f7l7", "f0+l0"):
        with pytest.raises(ValueError):
            parse_positions(bad)
    idx, valid = position_index([20, 6], [0, 14], 7, 7)
    assert idx[0][valid[0]].tolist() == list(range(7)) + list(range(13, 20))
    assert idx[1][valid[1]].tolist() == [14, 15, 16, 17, 18, 19]  # capped at len//2 = 3 each, shifted by the padding


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
    sh = Shifter(64, [1, 2], 4, 2, num_users=2, seed=0).attach(model)
    assert torch.equal(model(input_ids=ids).logits, base)  # hooks with no state do nothing
    idx, valid = position_index([12], [0], 0, 2)
    with sh.active(ShiftState(idx, valid, torch.tensor([1]), 12)):
        shifted = model(input_ids=ids).logits
    assert torch.equal(shifted[:, :10], base[:, :10])  # causal: positions before the shift are untouched
    assert not torch.allclose(shifted[:, 10:], base[:, 10:])
    sh.detach()
    assert torch.equal(model(input_ids=ids).logits, base)
    assert all(not p.requires_grad for p in model.parameters())


def test_layer_out_of_range_is_clear(llama):
    with pytest.raises(ValueError, match=r"out of range: the model has 4 decoder layers \(0..3\)"):
        check_layers(llama, [2, 9])
    with pytest.raises(ValueError, match="out of range"):
        Shifter(64, [7], 4, 2).attach(llama)


def _examples(tok, users=("a", "b", "c"), n=5, salt=""):
    ex = [Example(f"user {u} item {i}{salt} says what?", f" {'yes' if (i + len(u)) % 2 else 'no'}", u) for u in users for i in range(n)]
    return tokenize_examples(tok, ex, 256, {u: k for k, u in enumerate(users)})


def _instruction_examples(tok, users=("a", "b", "c"), n=5):
    """Examples opening with one long shared instruction, as real task prompts do."""
    ex = [Example(f"Answer yes or no to the question that follows. Question {u}{i * 7}: is it so? answer:",
                  f" {'yes' if (i + len(u)) % 2 else 'no'}", u) for u in users for i in range(n)]
    return tokenize_examples(tok, ex, 256, {u: k for k, u in enumerate(users)})


def _train(model, tok, ex, users, cache=True, collective=False, epochs=2, seed=0, share=True, first=2, frozen=True, disk=""):
    sh = Shifter(64, [1, 2], 4, 2, num_users=users, seed=seed)
    sh.set_all_personal(Shifter(64, [1, 2], 4, 2, num_users=1, seed=seed))  # every user starts from the same P0
    sh.attach(model)
    st = train_shifts(model, sh, ex, epochs=epochs, batch_size=2, lr=1e-2, train_collective=collective, pad_id=tok.pad_token_id,
                      first=first, last=2, seed=seed, cache_max_bytes=(1 << 30) if cache and not disk else 0, max_rows=4,
                      share_prefix=share, frozen_prefix=frozen, disk_cache_dir=disk, disk_cache_max_bytes=(1 << 30) if disk else 0)
    sh.detach()
    return sh, st


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("share", [False, True])
def test_cached_path_equals_uncached(tok, arch, share):
    """Lower-layer cache and shared-prefix passes against the plain full forward of every row."""
    model = tiny_llama(arch=arch, vocab=260)
    ex = _instruction_examples(tok)
    assert shared_prefix_len(ex[:4], 2, 2) > 40
    a, sa = _train(model, tok, ex, 3, cache=True, collective=True, share=share)
    b, sb = _train(model, tok, ex, 3, cache=False, collective=True, share=False)
    assert sa.cached_lower_layers and not sb.cached_lower_layers
    assert sa.epoch_losses == pytest.approx(sb.epoch_losses, rel=1e-5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_disk_cache_equals_uncached_and_leaves_nothing(tok, llama, tmp_path):
    """Over the memory bound the frozen states go to a memory-mapped file (unlinked at once); training is unchanged.
    Over both bounds they are recomputed."""
    ex = _instruction_examples(tok)
    a, sa = _train(llama, tok, ex, 3, disk=str(tmp_path / "c"), share=False)
    b, sb = _train(llama, tok, ex, 3, cache=False, share=False)
    assert sa.cached_lower_layers and sa.cached_on_disk and not sb.cached_lower_layers
    assert os.listdir(tmp_path / "c") == []
    assert sa.epoch_losses == pytest.approx(sb.epoch_losses, rel=1e-5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_frozen_prefix_path_equals_uncached(tok, arch):
    """Last-positions-only shifts (like l7): cached prefix keys/values + suffix-only passes give the same training as
    full forwards. Prompts of different lengths, so prefixes are re-padded. Sliding-window models fall back."""
    model = tiny_llama(arch=arch, vocab=260)
    ex = _examples(tok) + _instruction_examples(tok, n=2)
    for e in ex:
        e.module = {"a": 0, "b": 1, "c": 2}[e.key]
    a, sa = _train(model, tok, ex, 3, cache=True, collective=True, first=0)
    b, sb = _train(model, tok, ex, 3, cache=False, collective=True, first=0)
    assert sa.cached_frozen_prefix == (arch == "llama") and not sb.cached_lower_layers
    assert sa.epoch_losses == pytest.approx(sb.epoch_losses, rel=1e-5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_batched_users_equal_one_user_loop(tok, llama):
    ex = _examples(tok, users=("a", "b", "c"), n=5)
    ex[-1] = _examples(tok, users=("c",), n=9)[-1]  # unequal histories: users finish at different steps
    ex[-1].module = 2
    ex = ex + [e for e in _examples(tok, users=("c",), n=3, salt="x")]
    for e in ex:
        e.module = {"a": 0, "b": 1, "c": 2}[e.key]
    joint, _ = _train(llama, tok, ex, 3)
    for k, u in enumerate("abc"):
        mine = [copy.copy(e) for e in ex if e.key == u]
        for e in mine:
            e.module = 0
        alone, _ = _train(llama, tok, mine, 1)
        for l in joint.layers:
            for name, t in joint.personal[str(l)].slice_state(k).items():
                torch.testing.assert_close(t, alone.personal[str(l)].slice_state(0)[name], rtol=1e-4, atol=1e-5, msg=f"{u} {l} {name}")


def test_users_data_never_mix(tok, llama):
    ex = _examples(tok)
    changed = _examples(tok, salt=" CHANGED")
    changed = [c if c.key == "b" else e for e, c in zip(ex, changed)]  # only user b's data differs
    x, _ = _train(llama, tok, ex, 3)
    y, _ = _train(llama, tok, changed, 3)
    # other users' rows share padded batches with b, so equality is up to float rounding; a leak would be large
    for l in x.layers:
        for k in range(3):
            diff = max((x.personal[str(l)].slice_state(k)[n] - y.personal[str(l)].slice_state(k)[n]).abs().max().item()
                       for n in ("weight", "bias", "rotate_raw"))
            assert (diff > 1e-3) if k == 1 else (diff < 1e-5), (l, k, diff)


def test_training_lowers_loss_and_keeps_rotation_orthonormal(tok, llama):
    ex = _examples(tok, users=("a",), n=6)
    sh, st = _train(llama, tok, ex, 1, collective=True, epochs=6)
    assert st.epoch_losses[-1] < st.epoch_losses[0]
    for m in list(sh.personal.values()) + list(sh.collective.values()):
        R = m.rotation()
        torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(R.shape[1]).expand_as(R @ R.transpose(1, 2)), atol=1e-5, rtol=0)
        assert not torch.allclose(m.rotate_raw, LowRankShift(m.num, 64, m.rank, torch.Generator().manual_seed(0)).rotate_raw)


def test_masked_adamw_matches_torch_adamw_and_skips_inactive():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(2, 3))
    q = torch.nn.Parameter(p.detach()[0:1].clone())
    ours, ref = MaskedAdamW([p], lr=0.1), torch.optim.AdamW([q], lr=0.1, weight_decay=0.0)
    before_row1 = p.detach()[1].clone()
    for step in range(3):
        g = torch.randn(1, 3)
        p.grad = torch.cat([g, torch.zeros(1, 3)])
        q.grad = g.clone()
        ours.step(torch.tensor([True, False]))
        ref.step()
    torch.testing.assert_close(p.detach()[0:1], q.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(p.detach()[1], before_row1)


def test_loss_only_on_target_tokens(tok, llama):
    ex = _examples(tok, users=("a",), n=2)
    sh = Shifter(64, [1], 4, 2).attach(llama)
    loss, raw, n = forward_loss(llama, sh, ex, [1.0, 1.0], tok.pad_token_id, 2, 2, None, 1)
    assert n == sum(len(e.ids) - e.prompt_len for e in ex)
    ids = torch.tensor([ex[0].ids])
    logits = llama(input_ids=ids).logits[0, ex[0].prompt_len - 1: -1]
    want = torch.nn.functional.cross_entropy(logits, ids[0, ex[0].prompt_len:], reduction="sum")
    with torch.no_grad():
        loss0, _, _ = forward_loss(llama, Shifter(64, [1], 4, 2, seed=0), ex[:1], [1.0], tok.pad_token_id, 2, 2, None, 1)
    sh.detach()
    torch.testing.assert_close(loss0, want, rtol=1e-4, atol=1e-4)  # an unattached shifter: the plain model's loss
    assert ex[0].ids[-1] == tok.eos_token_id


def test_zero_init_starts_as_the_identity_and_still_learns(tok, llama):
    """shift_init='zero' (W = R, b = 0): the shifted model equals the bare one until the first step, then trains."""
    ids = torch.tensor([tokenize_examples(tok, [Example("a prompt here", " x", "a")], 64)[0].ids])
    bare = llama(input_ids=ids).logits
    sh = Shifter(64, [1, 2], 4, 2, num_users=2, seed=1, init="zero").attach(llama)
    with sh.active(ShiftState(torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool), torch.tensor([1]), ids.shape[1])):
        assert torch.equal(llama(input_ids=ids).logits, bare)
    sh.detach()
    ex = _instruction_examples(tok)
    sh = Shifter(64, [1, 2], 4, 2, num_users=3, seed=1, init="zero").attach(llama)
    st = train_shifts(llama, sh, ex, epochs=3, batch_size=2, lr=1e-2, train_collective=True, pad_id=tok.pad_token_id,
                      first=2, last=2)
    sh.detach()
    assert st.epoch_losses[-1] < st.epoch_losses[0]
    with pytest.raises(ValueError, match="shift init"):
        Shifter(64, [1], 4, 2, init="ones")
