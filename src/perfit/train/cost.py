"""What a run's work costs on this device, measured on a few of the run's own examples: seconds per token of
training (once per example: the frozen caches; every epoch: forward and backward), of a forward pass alone, of
generating one query, and the working memory of one training pass. `plan` turns these rates into a run's estimate."""
from __future__ import annotations

import contextlib
import math
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
    train_token_epoch_s: float  # one epoch of training, per token of the examples (beside train_pass_s)
    train_token_once_s: float  # the frozen-state caches, once per token of the examples
    forward_token_s: float  # a forward pass with the shifts (generator features, validation), per token
    generate_query_s: float  # one query answered (beside generate_batch_s), queries at the quantiles of the prompt length
    pass_bytes_per_row_token: float  # working memory of a training pass, per row and padded token
    base_bytes: int  # the process's memory (CPU: resident set; GPU: allocated) before the work
    sample_examples: int
    sample_tokens: int
    seconds: float  # what measuring took
    generate_batch_s: float = 0.0  # one generation batch beside its queries' cost
    train_pass_s: float = 0.0  # one training pass (a step's rows, forward and backward) beside its tokens' cost
    others_cpu: float = 0.0  # cores other processes kept busy while measuring (CPU); above ~0.5 the rates run high

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


class OthersCpu:
    """Cores that other processes kept busy inside the block (machine-wide busy CPU time minus this process's),
    so a plan timed beside another job says so instead of silently running high."""

    def __enter__(self):
        import psutil

        self._t, self._all, self._own = time.perf_counter(), self._busy(psutil.cpu_times()), self._mine()
        return self

    @staticmethod
    def _busy(t) -> float:
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    @staticmethod
    def _mine() -> float:
        import psutil

        t = psutil.Process().cpu_times()
        return t.user + t.system

    def __exit__(self, *exc):
        import psutil

        wall = max(time.perf_counter() - self._t, 1e-9)
        others = (self._busy(psutil.cpu_times()) - self._all) - (self._mine() - self._own)
        self.cores = max(0.0, others / wall)


SAMPLE_EXAMPLES = 16  # the timed pass's examples, at the quantiles of the prompt length: trained 16 and 8 rows a pass
SAMPLE_TOKENS = 2048  # ... halved (every other, down to 4) while over this many tokens: long prompts cost the plan
REPEATS = 3  # timed epochs (forwards: 2): the fastest counts, so a burst of other work does not


def measure(model, tok, cfg, hidden_size: int, first: int, last: int, examples: list[Example], queries: list[list[int]],
            max_new_tokens: int, train_kw: dict) -> Rates:
    """Rates from `examples` (SAMPLE_EXAMPLES of the run's own, fewer past SAMPLE_TOKENS) trained at the run's
    settings for 1 + REPEATS epochs in one pass a step and again in two (the first epoch pays the caches once; the
    fastest of the others is a plain epoch; the two split an epoch into its tokens' cost and its passes'), the
    faster of two forward passes over them, and `queries` (prompt token ids; half of them past SAMPLE_TOKENS)
    answered in one batch and in two."""
    with OthersCpu() as others:
        rates = _measure(model, tok, cfg, hidden_size, first, last, examples, queries, max_new_tokens, train_kw)
    rates.others_cpu = round(others.cores, 2) if next(model.parameters()).device.type == "cpu" else 0.0
    return rates


def fastest(fn, n: int) -> float:
    """The shortest of n timed calls of fn, in seconds."""
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _measure(model, tok, cfg, hidden_size, first, last, examples, queries, max_new_tokens, train_kw) -> Rates:
    t_start = time.perf_counter()
    device = next(model.parameters()).device
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    sh = Shifter(hidden_size, cfg.layers, cfg.low_rank_dimension, cfg.user_low_rank_dimension, 1, cfg.seed,
                 cfg.shift_init).to(device, dtype)
    ex = tokenize_examples(tok, examples, cfg.max_length)
    full, m = ex, len(ex)
    while m > 4 and sum(len(e.ids) for e in ex) > SAMPLE_TOKENS:
        m //= 2  # the sample is in length order: the middles of m equal slices keep its spread (not its long end)
        ex = [full[(2 * k + 1) * len(full) // (2 * m)] for k in range(m)]
    if len(queries) > 1 and sum(map(len, queries)) > SAMPLE_TOKENS:
        queries = [queries[(2 * k + 1) * len(queries) // (2 * (len(queries) // 2))] for k in range(len(queries) // 2)]
    tokens = sum(len(e.ids) for e in ex)
    kw = dict(train_kw, disk_cache_dir="")  # the sample's states always fit in memory

    def epochs_at(batch: int, mem: PeakMemory | None = None) -> tuple[float, float]:
        """(first epoch's extra seconds: the caches, fastest plain epoch) training the sample `batch` rows a step."""
        marks: list[float] = []
        with mem or contextlib.nullcontext():
            t0 = time.perf_counter()
            train_shifts(model, sh, ex, epochs=1 + REPEATS, batch_size=batch, lr=cfg.lr, train_collective=True,
                         pad_id=tok.pad_token_id, first=first, last=last, seed=cfg.seed, desc="measuring",
                         on_epoch=lambda _state: marks.append(time.perf_counter()), fault="", **kw)
            t1 = time.perf_counter()
        # on_epoch marks every epoch's end but the last's, which is t1
        ends = marks[-REPEATS:] + [t1] if len(marks) >= REPEATS else [t0 + (t1 - t0) * (k + 1) / (1 + REPEATS)
                                                                        for k in range(1 + REPEATS)]
        epoch = max(min(b - a for a, b in zip(ends, ends[1:])), 1e-9)
        return max(ends[0] - t0 - epoch, 0.0), epoch

    with sh.attached(model):
        # a forward first, untimed: the first pass pays one-time costs (allocations, kernels) a run pays once
        mean_loss(model, sh, ex, tok.pad_token_id, first, last, max_rows=kw.get("max_rows", 32))
        fwd = fastest(lambda: mean_loss(model, sh, ex, tok.pad_token_id, first, last, max_rows=kw.get("max_rows", 32)), 2)
        mem = PeakMemory(device)
        once, whole = epochs_at(len(ex), mem)  # one pass an epoch
        # two passes an epoch over the same tokens: the difference is what a pass costs beside its tokens, so a run's
        # stage is estimated at its own rows a pass (a pass of 4 rows costs twice a pass of 32's per token on a CPU)
        halves = epochs_at(max(len(ex) // 2, 1))[1] if len(ex) > 1 else whole
        pass_s = min(max(halves - whole, 0.0), whole)
        epoch = max(whole - pass_s, 1e-9)
    gen = gen_batch = 0.0
    if queries:  # in one batch and in two (as the run answers them: sorted by length, little padding); the difference
        # is what a batch costs beside its queries, so the predictions are estimated at the run's --eval_batch_size
        def answer(batch: int) -> float:
            return fastest(lambda: greedy_generate(model, tok, queries, max_new_tokens=max_new_tokens, batch_size=batch,
                                                    desc="measuring"), 1)
        # untimed first: the process's first generation pays one-time costs (seen: Gemma's one batch timed slower
        # than the same queries in two after it, so no per-batch cost was found and each query cost 2.7x the run's)
        greedy_generate(model, tok, queries[:2], max_new_tokens=max_new_tokens, batch_size=2, desc="measuring")
        one = answer(len(queries))
        gen_batch = min(max(answer(math.ceil(len(queries) / 2)) - one, 0.0), one) if len(queries) > 1 else 0.0
        gen = (one - gen_batch) / len(queries)
    row_tokens = len(ex) * max(len(e.ids) for e in ex)  # the sample's one pass, padded to its longest row
    return Rates(train_token_epoch_s=epoch / tokens, train_pass_s=pass_s, train_token_once_s=once / tokens, forward_token_s=fwd / tokens,
                 generate_query_s=gen, generate_batch_s=gen_batch, pass_bytes_per_row_token=mem.delta / max(row_tokens, 1), base_bytes=mem.base,
                 sample_examples=len(ex), sample_tokens=tokens, seconds=time.perf_counter() - t_start)
