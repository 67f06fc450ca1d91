"""PerFit on vLLM against plain vLLM and against PerFit's embedded server, on the same 1,000 queries of 1,000 distinct
stored users.

1. The serve_load run (bundled model, generated data of --task_name; made once under --work_dir) with its 1,000
   stored users (trained shifts + noise: every user has a shift of its own).
2. One task query per user (the data's test queries, cycled), the task's answer length, greedy.
3. Each server in turn on loopback, started by `perfit serve` (float32, batches of up to --max_batch_size in both
   engines), sent every query by --clients threads at once; wall time from the first request to the last answer:
   - vLLM + plugin (`--engine vllm`), each request naming its user (OpenAI `user` field): task answers (ending at
     the first newline), then exactly 8 tokens each (EOS ignored);
   - plain vLLM: the same server and prompts with the plugin off, exactly 8 tokens each: shifted answers are shorter
     than the base model's, so only fixed lengths compare the engines like for like;
   - the embedded server (`/v1/generate`, the default engine): task answers.
   Both vLLM servers run eager (the plugin needs it); plain vLLM compiled was no faster on this CPU (README).

    python benchmarks/vllm_speed.py [--task_name movie_tagging] [--clients 64]

Last line: vllm_personalized_vs_base=<throughput ratio, fixed lengths> vllm_vs_embedded=<throughput ratio, task answers>
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

import httpx
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_load import N_USERS, fill_store, make_run, run_data  # noqa: E402

from perfit import PerFitModel  # noqa: E402
from perfit.serve.launch import launch, stop  # noqa: E402


def send_all(url: str, bodies: list[dict], path: str, clients: int) -> tuple[float, list[str], int]:
    """Every body posted by `clients` threads; (seconds, answers in order, errors)."""
    def one(body):
        with httpx.Client(timeout=600) as c:
            r = c.post(url + path, json=body)
        if r.status_code != 200:
            return None
        j = r.json()
        return j["output"] if "output" in j else j["choices"][0]["text"].strip()

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as ex:
        out = list(ex.map(one, bodies))
    return time.perf_counter() - t0, out, sum(o is None for o in out)


def plain_vllm(run: str, max_batch_size: int):
    """The very vLLM server that `perfit serve --engine vllm` starts, without the plugin: (process, url)."""
    from perfit.config import ServeConfig
    from perfit.serve.launch import free_port, start
    from perfit.vllm_plugin import ENV_RUN_DIR
    from perfit.vllm_plugin.server import vllm_command

    port = free_port()
    argv, env = vllm_command(ServeConfig(run_dir=run, port=port, dtype="float32", engine="vllm", max_batch_size=max_batch_size))
    env.pop(ENV_RUN_DIR)
    return start(argv, port, health="/health", timeout=600, env=env, what="vLLM")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work_dir", default="/tmp/perfit-bench/serve")
    ap.add_argument("--task_name", default="movie_tagging")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max_batch_size", type=int, default=32)
    args = ap.parse_args()
    run = make_run(args.work_dir, args.task_name)
    users = fill_store(run)
    td = run_data(run, args.task_name)
    inputs = [q.input for u in td.test_users for q in u.query]
    pm = PerFitModel.from_run(run, device="cpu")
    n_new = pm.task.max_new_tokens
    queries = [(u, inputs[i % len(inputs)]) for i, u in enumerate(users)]
    prompt_of = {x: pm.builder.query_prompt(x) for x in inputs}  # the answer cue, as /v1/generate adds it
    del pm
    common = ("--dtype", "float32", "--max_batch_size", str(args.max_batch_size))
    results = {}

    def phase(name, url, bodies, path):
        send_all(url, bodies[:8], path, 8)  # warm-up
        secs, answers, errors = send_all(url, bodies, path, args.clients)
        results[name] = {"seconds": secs, "rps": len(bodies) / secs, "errors": errors, "answers": answers}
        print(f"{name:28s} {len(bodies)} requests in {secs:7.1f} s  {len(bodies) / secs:6.2f} req/s  errors {errors}", flush=True)

    def completions(personal: bool, fixed: bool) -> list[dict]:
        # fixed: exactly n_new tokens each (EOS ignored), so that shifted and unshifted answers cost the same
        return [{"model": "perfit", "prompt": prompt_of[x], "max_tokens": n_new, "temperature": 0}
                | ({"ignore_eos": True} if fixed else {"stop": ["\n"]}) | ({"user": u} if personal else {})
                for u, x in queries]

    proc, url = launch(run, "--engine", "vllm", *common, lifetime=3600, timeout=600)
    try:
        phase("vllm_personalized (answers)", url, completions(True, False), "/v1/completions")
        phase("vllm_personalized (8 tokens)", url, completions(True, True), "/v1/completions")
    finally:
        stop(proc, timeout=60)
    proc, url = plain_vllm(run, args.max_batch_size)
    try:
        phase("vllm_base (8 tokens)", url, completions(False, True), "/v1/completions")
    finally:
        stop(proc, timeout=60)
    proc, url = launch(run, *common, "--max_wait_ms", "20", "--device", "cpu", lifetime=3600, timeout=300)
    try:
        phase("embedded (answers)", url, [{"user_id": u, "input": x, "max_new_tokens": n_new} for u, x in queries],
              "/v1/generate")
    finally:
        stop(proc, timeout=60)
    r = {k.split(" ")[0] + ("_fixed" if "tokens" in k else ""): v for k, v in results.items()}
    same = sum(a == b for a, b in zip(r["vllm_personalized"]["answers"], r["embedded"]["answers"]))
    print(f"run {run}: {N_USERS} distinct stored users, one query each, up to {n_new} new tokens, {args.clients} clients, "
          f"batches up to {args.max_batch_size}, {torch.get_num_threads()} threads; vLLM + plugin and the embedded server "
          f"gave the same answer to {same} of {len(queries)} queries")
    print(f"vllm_personalized_vs_base={r['vllm_personalized_fixed']['rps'] / r['vllm_base_fixed']['rps']:.2f} "
          f"vllm_vs_embedded={r['vllm_personalized']['rps'] / r['embedded']['rps']:.2f}")

if __name__ == "__main__":
    main()
