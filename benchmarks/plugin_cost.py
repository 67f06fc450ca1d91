"""What the vLLM plugin adds to a step, on any device, without vLLM: its own code (the token plan, the device slots,
the layer hook) on vLLM's flattened layout, against the backbone's forward on the same tokens.

A random-weight Llama (default: Llama-2-7B's widths, bf16) runs one prefill step of --requests prompts of --prompt_len
tokens as one flattened batch; the plugin's per-step work for it is the plan of which tokens to shift plus, at each
shifted layer, the hook on a (hidden, residual) pair of that batch. A decoding step costs the plugin nothing beyond
one comparison (no prompt token is scheduled), so prefill steps bound its overhead. Users' shifts come from a user
store of --users users; the first time each one is read into its device slot is timed too.

    python benchmarks/plugin_cost.py [--device cuda] [--layers 32 --hidden 4096 --intermediate 11008]

Last line: plugin_step_vs_forward=<plugin seconds / forward seconds> slot_load_ms=<ms per user>
"""
from __future__ import annotations

import argparse
import sys
import os
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import timed  # noqa: E402

from perfit.method.shifts import Shifter
from perfit.store import UserStore
from perfit.method.bank import ShiftBank
from perfit.method.shifts import shift_hook
from perfit.vllm_plugin.admission import RunInfo, acquire, plan_tokens, step_state


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt_len", type=int, default=512)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--shift_layers", default="14;15;16")
    ap.add_argument("--positions", default="f7+l7")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--user_rank", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    from perfit.config import parse_positions

    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=32000)
    torch.manual_seed(0)
    with dev:
        model = LlamaForCausalLM(cfg).to(dt).eval()
    layers = [int(x) for x in args.shift_layers.split(";")]
    sh = Shifter(args.hidden, layers, args.rank, args.user_rank, args.users, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        store = UserStore(os.path.join(tmp, "users.sqlite"), {"key": "bench"})
        store.put_many({f"u{k:04d}": sh.user_state(k) for k in range(args.users)})
        first, last = parse_positions(args.positions)
        info = RunInfo(tmp, first, last, store)
        bank = ShiftBank(sh.spawn(1), dev, capacity=args.users, dtype=torch.float32)
        t0 = time.perf_counter()
        slots = [acquire(bank, info, f"u{k:04d}", store.version(f"u{k:04d}")) for k in range(args.users)]
        load_ms = (time.perf_counter() - t0) / args.users * 1000
        R, L = args.requests, args.prompt_len
        ids = torch.randint(0, 32000, (R, L), device=dev)

        @torch.no_grad()
        def forward():
            model.model(input_ids=ids, use_cache=False)  # the backbone's prefill of the same R x L tokens

        hidden = torch.randn(R * L, args.hidden, device=dev, dtype=dt)
        residual = torch.randn_like(hidden)
        hooks = [shift_hook(bank, l, lambda: plan[0]) for l in layers]
        plan = [None]

        @torch.no_grad()
        def plugin_step():
            index, slot_of = plan_tokens(info, [L] * R, [0] * R, [L] * R, slots[:R])
            plan[0] = step_state(index, slot_of, dev)
            for h in hooks:
                h(None, None, (hidden, residual))

        t_fwd = timed(forward, dev, args.reps)
        t_plugin = timed(plugin_step, dev, args.reps * 4)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{name}, {args.dtype}: Llama {args.layers} layers x {args.hidden} (random weights), one prefill step of "
          f"{R} x {L} tokens: forward {t_fwd * 1000:.1f} ms; the plugin's plan + hooks on layers {layers} "
          f"({args.positions}, ranks {args.rank}/{args.user_rank}, {R} distinct users) {t_plugin * 1000:.2f} ms; "
          f"reading {args.users} users into device slots {load_ms:.2f} ms each")
    print(f"plugin_step_vs_forward={t_plugin / t_fwd:.4f} slot_load_ms={load_ms:.2f}")


if __name__ == "__main__":
    main()
