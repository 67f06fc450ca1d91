"""What a run's work costs on this device, measured on a few of the run's own examples: seconds per token of
training (once per example: the frozen caches; every epoch: forward and backward), of a forward pass alone, of
generating one query, and the working memory of one training pass. `plan` turns these rates into a run's estimate."""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

import torch

from ..batching import tokenize_examples
from ..generate import greedy_generate
from ..prompts import Example
from ..method.shifts import Shifter
from .forward import mean_loss
from .loop import train_shifts


@dataclass
class Rates:
    train_token_epoch_s: float  # one epoch of training, per token of the examples
    train_token_once_s: float  # the frozen-state caches, once per token of the examples
    forward_token_s: float  # a forward pass with the shifts (generator features, validation), per token
    generate_query_s: float  # one query answered, in one batch of queries at the quantiles of the prompt length
    pass_bytes_per_row_token: float  # working memory of a training pass, per row and padded token
    base_bytes: int  # the process's memory (CPU: resident set; GPU: allocated) before the work
    sample_examples: int
    sample_tokens: int
    seconds: float  # what measuring took

    def as_dict(self) -> dict:
        return asdict(self)


class PeakMemory:
    """Peak memory of the work inside the block: the CUDA allocator's peak on a GPU, else the resident set sampled
    every few milliseconds (a pass lasts far longer)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.base = self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        import psutil

        return psutil.Process().memory_info().rss

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = self.peak = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = self._rss()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.base)


def measure(model, tok, cfg, hidden_size: int, first: int, last: int, examples: list[Example], queries: list[list[int]],
            max_new_tokens: int, train_kw: dict) -> Rates:
    """Rates from `examples` (a few of the run's own, one pass) trained for two epochs at the run's settings (the
    first epoch pays the caches once, the second is a plain epoch), a forward pass over them, and one generation
    batch of `queries` (prompt token ids)."""
    t_start = time.perf_counter()
    device = next(model.parameters()).device
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    sh = Shifter(hidden_size, cfg.layers, cfg.low_rank_dimension, cfg.user_low_rank_dimension, 1, cfg.seed,
                 cfg.shift_init).to(device, dtype)
    ex = tokenize_examples(tok, examples, cfg.max_length)
    tokens = sum(len(e.ids) for e in ex)
    marks: list[float] = []
    kw = dict(train_kw, disk_cache_dir="")  # the sample's states always fit in memory
    with sh.attached(model):
        # a forward first, untimed: the first pass pays one-time costs (allocations, kernels) a run pays once
        mean_loss(model, sh, ex, tok.pad_token_id, first, last, max_rows=kw.get("max_rows", 32))
        f0 = time.perf_counter()
        mean_loss(model, sh, ex, tok.pad_token_id, first, last, max_rows=kw.get("max_rows", 32))
        fwd = time.perf_counter() - f0
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            train_shifts(model, sh, ex, epochs=2, batch_size=len(ex), lr=cfg.lr, train_collective=True,
                         pad_id=tok.pad_token_id, first=first, last=last, seed=cfg.seed, desc="measuring",
                         on_epoch=lambda _state: marks.append(time.perf_counter()), fault="", **kw)
            t1 = time.perf_counter()
        t_mid = marks[0] if marks else t0 + (t1 - t0) / 2
        epoch = max(t1 - t_mid, 1e-9)
        once = max(t_mid - t0 - epoch, 0.0)
    g0 = time.perf_counter()
    if queries:  # one batch, as the run answers them (sorted by length, little padding)
        greedy_generate(model, tok, queries, max_new_tokens=max_new_tokens, batch_size=len(queries), desc="measuring")
    gen = (time.perf_counter() - g0) / max(len(queries), 1)
    row_tokens = len(ex) * max(len(e.ids) for e in ex)  # the sample's one pass, padded to its longest row
    return Rates(train_token_epoch_s=epoch / tokens, train_token_once_s=once / tokens, forward_token_s=fwd / tokens,
                 generate_query_s=gen, pass_bytes_per_row_token=mem.delta / max(row_tokens, 1), base_bytes=mem.base,
                 sample_examples=len(ex), sample_tokens=tokens, seconds=time.perf_counter() - t_start)
