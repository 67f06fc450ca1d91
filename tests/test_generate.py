"""Generation: mixed users in one batch, shared prompt prefixes, shifts on prompt positions only. Compared by the
logits of every decoding step (float64 model: equal in principle means equal to ~1e-12); tokens are compared only at
steps whose top-2 margin is wide."""
import pytest
import torch

from perfit.batching import shared_prompt_prefix, tokenize_prompt
from perfit.generate import _prefill, greedy_generate
from perfit.method.shifts import Shifter, ShiftState

from conftest import model64, wide_margin_tokens

EXACT = dict(rtol=1e-9, atol=1e-10)
HEAD = "Which tag fits this movie among the tags? description: "


def _users_shifter(n=3, seed=5):
    sh = Shifter(64, [1, 2], 4, 2, num_users=n, seed=seed).double()  # each user its own random module
    return sh


def _gen(model, tok, prompts, owners, sh, **kw):
    kw = dict(first=3, last=2, max_new_tokens=6, stop_early=False, with_logits=True) | kw
    return greedy_generate(model, tok, prompts, owners, sh, **kw)


@pytest.fixture(scope="module")
def m64():
    return model64()


def test_mixed_user_batch_equals_each_user_alone(tok, m64):
    """Queries of three users with their own shifts, mixed in one left-padded batch (different lengths, shared
    instruction), decode exactly as each user's queries alone, one at a time."""
    sh = _users_shifter()
    prompts = [tokenize_prompt(tok, HEAD + d, 200) for d in ("a quiet drama", "space war" * 3, "x", "robots in love again", "ok")]
    owners = [0, 1, 2, 1, 0]
    with sh.attached(m64):
        mixed = _gen(m64, tok, prompts, owners, sh, batch_size=8)
        alone = [_gen(m64, tok, [p], [o], sh, batch_size=1) for p, o in zip(prompts, owners)]
    for i, a in enumerate(alone):
        torch.testing.assert_close(mixed.logits[i], a.logits[0], **EXACT, msg=f"prompt {i}")
        wide = wide_margin_tokens(a.logits[0])
        assert wide.sum() >= 3
        assert [t for t, w in zip(mixed.tokens[i], wide) if w] == [t for t, w in zip(a.tokens[0], wide) if w]
    # the users' shifts matter: the same prompt under two users' shifts decodes differently
    with sh.attached(m64):
        two = _gen(m64, tok, [prompts[0], prompts[0]], [0, 1], sh)
    assert (two.logits[0] - two.logits[1]).abs().max() > 1e-3


@pytest.mark.parametrize("first,last,users", [(3, 2, True), (0, 3, True), (3, 2, False), (0, 0, False)])
def test_shared_prefix_generation_equals_full_prefill(tok, m64, first, last, users):
    """A batch's shared instruction runs once (once per user when a shift acts inside it): the prefill logits and
    every decoding step equal those of full left-padded prefills, for mixed users, collective only, and no shift."""
    sh = _users_shifter()
    prompts = [tokenize_prompt(tok, HEAD + d, 200) for d in ("a quiet drama", "space war", "x", "robots in love again", "ok")]
    owners = [0, 1, 2, 1, 0] if users else None
    shifter = sh if (first or last) else None
    assert 8 <= shared_prompt_prefix(prompts, first, last) <= len(tokenize_prompt(tok, HEAD, 200))
    keep = {"logits_to_keep": 1}
    with sh.attached(m64):
        a, _, pa = _prefill(m64, prompts, owners, shifter, True, first, last, tok.pad_token_id, True, keep)
        b, _, pb = _prefill(m64, prompts, owners, shifter, True, first, last, tok.pad_token_id, False, keep)
        torch.testing.assert_close(a.logits[:, -1], b.logits[:, -1], **EXACT)
        assert torch.equal(pa, pb)
        shared = _gen(m64, tok, prompts, owners, shifter, first=first, last=last)
        full = _gen(m64, tok, prompts, owners, shifter, first=first, last=last, share_prefix=False)
    for x, y in zip(shared.logits, full.logits):
        torch.testing.assert_close(x, y, **EXACT)


def test_generated_tokens_are_not_shifted(tok, m64):
    """With the shift on the last prompt token only, the second step's logits equal a manual forward of prompt +
    first token with the shift on the prompt position only, and differ from one that also shifts the new token."""
    sh = _users_shifter(n=1, seed=3)
    prompt = tokenize_prompt(tok, "hello there", 100)
    n = len(prompt)
    with sh.attached(m64):
        out = greedy_generate(m64, tok, [prompt], [0], sh, first=0, last=1, max_new_tokens=2, stop_early=False, with_logits=True)
        ids = torch.tensor([prompt + [out.tokens[0][0]]])

        def manual(positions):
            state = ShiftState(torch.tensor([positions]), torch.ones(1, len(positions), dtype=torch.bool), torch.tensor([0]), n + 1)
            with sh.active(state):
                return m64(input_ids=ids).logits[0, -1].float()

        prompt_only, also_new = manual([n - 1]), manual([n - 1, n])
        first_step = m64(input_ids=ids[:, :n]).logits[0, -1]  # control: the first step was shifted
    torch.testing.assert_close(out.logits[0][1], prompt_only, **EXACT)
    assert (out.logits[0][1] - also_new).abs().max() > 1e-3
    assert (out.logits[0][0] - first_step.float()).abs().max() > 1e-3


class _Scripted(torch.nn.Module):
    """Emits a fixed token script whatever the input (to test the decoder's stopping rules)."""

    def __init__(self, script, vocab):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.script, self.vocab, self.step = script, vocab, 0

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=True, cache=None, logits_to_keep=0):
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        return type("Out", (), {"logits": logits, "cache": object()})()


def test_decoder_skips_leading_newlines_and_stops_at_the_next(tok):
    nl, a, b, eos = tok("\n")["input_ids"][0], tok("a")["input_ids"][0], tok("b")["input_ids"][0], tok.eos_token_id
    assert greedy_generate(_Scripted([nl, nl, a, b, nl, a], len(tok)), tok, [[5, 6]], max_new_tokens=10) == ["ab"]
    assert greedy_generate(_Scripted([a, eos, b], len(tok)), tok, [[5, 6]], max_new_tokens=10) == ["a"]
    assert greedy_generate(_Scripted([a, nl, b], len(tok)), tok, [[5, 6]], max_new_tokens=3, stop_early=False) == ["a"]


def test_an_answer_as_long_as_max_length_leaves_no_room_and_says_so(finished_run):
    """max_new_tokens >= max_length left `limit` <= 0, and `ids[-limit:]` then kept the wrong end of the prompt (or
    all of it, or nothing): now it is refused, naming the setting."""
    from perfit import PerFitModel
    from perfit.batching import tokenize_prompt

    _, res = finished_run
    pm = PerFitModel.from_run(res["run_dir"], device="cpu")
    L = pm.cfg.max_length
    assert len(pm.prompt_ids(["a query"], max_new_tokens=L - 1)[0]) == 1  # the end of the prompt, one token
    for n in (L, L + 5):
        with pytest.raises(ValueError, match=f"max_new_tokens {n}.*max_length {L}"):
            pm.prompt_ids(["a query"], max_new_tokens=n)
    with pytest.raises(ValueError, match="no room"):
        tokenize_prompt(pm.tok, "a query", 0)
