import json
import os

import pytest
import torch

from perfit.backbone import tiny_llama, tiny_tokenizer

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def _threads():
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


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def shared_dir(*parts):
    p = os.path.join(SHARED, *parts)
    if not os.path.exists(p):
        pytest.skip(f"shared data not present: {p}")
    return p
