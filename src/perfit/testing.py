"""Tiny randomly initialised models of every decoder family PerFit supports, and a byte tokenizer, built offline from
configs: what the tests (and anyone checking a family) run on in seconds. Nothing here is used at run time."""
from __future__ import annotations

import torch

from .backbone import _fix_tokenizer, exact_float64, freeze
from .errors import ConfigError


def _configs(hidden: int, num_layers: int, vocab: int) -> dict:
    """Tiny configs of each family, with the settings that make the family differ from Llama set to values that
    change the result (soft-capping, logit scales, sliding windows, QK norms, multipliers)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=num_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2,
                  bos_token_id=1, pad_token_id=2)
    return {
        "llama": lambda: tf.LlamaConfig(**common, tie_word_embeddings=True),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**(common | {"pad_token_id": 0}), head_dim=16, sliding_window=8,
                                          final_logit_softcapping=3.0, attn_logit_softcapping=5.0, query_pre_attn_scalar=16),
        "gemma3": lambda: tf.Gemma3TextConfig(**(common | {"pad_token_id": 0}), head_dim=16, sliding_window=8,
                                              final_logit_softcapping=3.0),
        "phi3": lambda: tf.Phi3Config(**common),
        "olmo2": lambda: tf.Olmo2Config(**common),
        "granite": lambda: tf.GraniteConfig(**common, logits_scaling=4.0, embedding_multiplier=2.0,
                                            residual_multiplier=0.5, attention_multiplier=0.2),
        "cohere": lambda: tf.CohereConfig(**common, logit_scale=0.25),
    }


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "olmo2", "granite", "cohere")


def tiny_model(arch: str = "llama", num_layers: int = 4, hidden: int = 64, vocab: int = 256, seed: int = 0,
               dtype: torch.dtype = torch.float32, config: dict | None = None):
    """A tiny randomly initialised decoder of the family `arch` (one of FAMILIES), frozen; float64 computes in float64
    throughout (backbone.exact_float64). `config`: settings over the family's tiny config (e.g. its sliding_window)."""
    from transformers import AutoModelForCausalLM

    configs = _configs(hidden, num_layers, vocab)
    if arch not in configs:
        raise ConfigError(f"tiny model {arch!r}: choose from {', '.join(configs)}")
    cfg = configs[arch]()
    for k, v in (config or {}).items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = freeze(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32))
    if dtype == torch.float64:
        model = exact_float64(model.double())
    return model


def tiny_llama(num_layers: int = 4, hidden: int = 64, vocab: int = 256, seed: int = 0, arch: str = "llama",
               config: dict | None = None):
    """The tiny model most tests use (a Llama unless `arch` says otherwise)."""
    return tiny_model(arch, num_layers, hidden, vocab, seed, config=config)


def tiny_tokenizer():
    """A byte-level tokenizer (259 ids: <unk>, <s>, </s>, then the 256 bytes) built offline, for tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # byte b -> id 3 + b, through GPT-2's byte-to-symbol table (ByteLevel.alphabet() comes in a different random
    # order in every process, which once gave every test session other token ids)
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    symbol = {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(b for b in range(256) if b not in printable)}
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {symbol[b]: 3 + b for b in range(256)}
    assert set(symbol.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    t = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    return _fix_tokenizer(tok)
