import json
import os

import pytest
import torch

from perfit.testing import tiny_llama, tiny_tokenizer

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")

# pinned before any fixture trains anything (session fixtures run before function-scoped ones)
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def llama():
    return tiny_llama(num_layers=4, hidden=64, vocab=260)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tok):
    """A tiny random Llama + byte tokenizer saved as a Hugging Face folder (for --model_path)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(num_layers=4, hidden=64, vocab=260, seed=1).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


# a tiny run: layers 1-2 of the 4-layer tiny Llama, small ranks, one epoch (compare and pipeline tests share it)
# the seed's presets (--preset paper): the tests were written against them, and the tiny model is no "any model"
TINY_RUN = dict(task_name="movie_tagging", model_name="tiny", preset="paper", intervene_layer="1;2", low_rank_dimension=4,
                user_low_rank_dimension=2, max_epoch=1, batch_size=4, max_length=512, user_group_size=2, lr=1e-2, user_lr=1e-2)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Generated movie_tagging and news_headline data: 3 test users x 4 items x 2 queries, 2 other users (read only)."""
    from perfit.data.synthetic import generate

    d = str(tmp_path_factory.mktemp("data"))
    for t in ("movie_tagging", "news_headline"):
        generate(t, d, num_users=3, history_per_user=4, queries_per_user=2, num_other_users=2, seed=0)
    return d


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def shared_dir(*parts):
    p = os.path.join(SHARED, *parts)
    if not os.path.exists(p):
        pytest.skip(f"shared data not present: {p}")
    return p


def wide_margin_tokens(logits: torch.Tensor, margin: float = 1e-3) -> torch.Tensor:
    """Mask of decoding steps whose top-2 logit margin is wide enough that the greedy token cannot flip under float
    rounding (steps x vocab -> steps)."""
    top = logits.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]) > margin


def model64(arch: str = "llama", **kw):
    """The tiny model in float64 throughout (see backbone.exact_float64): computations that are equal in principle
    agree to ~1e-13."""
    from perfit.backbone import exact_float64

    return exact_float64(tiny_llama(arch=arch, vocab=260, **kw).double())


def run_cfg(tiny_model_dir, data_dir, out, **kw):
    from perfit.config import RunConfig

    return RunConfig(**(TINY_RUN | dict(data_dir=data_dir, output_dir=out, model_path=tiny_model_dir) | kw))


@pytest.fixture(scope="session")
def finished_run(tiny_model_dir, data, tmp_path_factory):
    """A finished `perfit run` on the tiny model (read only: tests that change it copy it first)."""
    from perfit import pipeline

    cfg = run_cfg(tiny_model_dir, data, str(tmp_path_factory.mktemp("out")))
    return cfg, pipeline.run(cfg)
