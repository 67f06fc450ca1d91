"""The `perfit` command: parses flags and calls library functions; no logic of its own. User errors (bad flags, bad
data, a run dir in another state) print one line and exit 2; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Callable

from .config import CompareConfig, RunConfig, ServeConfig
from .errors import PerFitError, user_message
from .tasks import TASKS

RUN_COMMANDS = {
    "run": "the whole pipeline: stage 1, stage 2, predictions and metrics for zero_shot, stage1 and perfit",
    "stage1": "train (or reuse) the collective shift only",
    "stage2": "train the personal shifts into the user store (needs the stage-1 checkpoint)",
    "predict": "predict and evaluate from a stored stage-1 checkpoint and user store (--run_dir R: settings from the run)",
}


def _add_config_flags(p: argparse.ArgumentParser, cls=RunConfig) -> None:
    """One flag per config field. Defaults are left out of the namespace, so that the flags a user gave are known
    (they override a run's saved config)."""
    for f in dataclasses.fields(cls):
        kw = {"choices": list(TASKS)} if f.name == "task_name" else {}
        p.add_argument(f"--{f.name}", type=type(f.default), default=argparse.SUPPRESS,
                       help=f"{f.metadata['help']} (default: {f.default!r})", **kw)
    p.add_argument("--config", default="", help=f"JSON or YAML file of {cls.__name__} fields (a run's config.json "
                                                f"reproduces it); flags given here override it.")
    p.add_argument("-q", "--quiet", action="store_true", help="Only warnings and the final summary.")


def _add_run_parsers(sub) -> None:
    for name, help in RUN_COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        _add_config_flags(p)
        if name == "predict":
            p.add_argument("--run_dir", default="", help="A run dir made by `perfit run`: its config gives every setting; "
                                                         "of the flags given here only --dtype, --cuda_device, "
                                                         "--eval_batch_size, --max_users and --data_dir apply (others "
                                                         "that differ from the run's are refused).")
    help = "run PerFit and its peers (OPPU, task LoRA, RAG, ...) on the same users; writes comparison.{json,md,png}"
    _add_config_flags(sub.add_parser("compare", help=help, description=help), CompareConfig)


def _add_model_parsers(sub) -> None:
    """The commands over a finished run's model: generate, personalize, serve, tune, analyze."""
    help = "answer one user's input with a finished run (settings from the run's config)"
    p = sub.add_parser("generate", help=help, description=help)
    p.add_argument("--run_dir", required=True, help="A run dir made by `perfit run` (or stage1 + stage2).")
    p.add_argument("--user_id", required=True, help="The user whose personal shift applies (unknown: the stage-1 shifts).")
    p.add_argument("--input", required=True, help="A task query (the answer cue is added as `perfit predict` does).")
    p.add_argument("--raw", action="store_true", help="Use --input as the prompt exactly as given.")
    p.add_argument("--max_new_tokens", type=int, default=0, help="Answer length (0: the task's).")
    p.add_argument("--device", default="", help="cpu, cuda or cuda:N (default: the run's GPU if CUDA is present).")
    help = "train (or retrain) personal shifts of users from a history file into a finished run's store"
    p = sub.add_parser("personalize", help=help, description=help)
    p.add_argument("--run_dir", required=True)
    p.add_argument("--history", required=True,
                   help="JSON file: a list of users [{user_id, profile: [history items]}] (the per-user layout).")
    p.add_argument("--device", default="")
    p.add_argument("--personalize", default="", choices=("", "train", "instant", "instant+train"),
                   help="train (stage 2), instant (the shift generator, no training) or instant+train (stage 2 from the "
                        "generated shift). Default: the run's.")
    help = "serve a run over HTTP: OpenAI-compatible completions and chat, /v1/generate, online personalization and erasure"
    p = sub.add_parser("serve", help=help, description=help)
    for f in dataclasses.fields(ServeConfig):
        p.add_argument(f"--{f.name}", type=type(f.default), default=f.default, required=f.name == "run_dir",
                       help=f"{f.metadata['help']} (default: {f.default!r})")
    from .tune import TuneConfig

    help = "search settings on held-out history (Optuna; a killed tune resumes); writes tune.json, tune.png, best_config.json"
    _add_config_flags(sub.add_parser("tune", help=help, description=help), TuneConfig)
    help = "what the shifts learned: their spectrum across users, the shared part, users in the top-2 plane"
    p = sub.add_parser("analyze", help=help, description=help)
    p.add_argument("--run_dir", required=True)
    p.add_argument("--output_dir", required=True, help="Folder of analysis.json and analysis.png.")
    p.add_argument("--max_users", type=int, default=0, help="The first N test users (0: all).")


def _add_store_parsers(sub) -> None:
    help = "operate a run's user store: ls, show, export, import, verify"
    p = sub.add_parser("store", help=help, description=help)
    p.add_argument("action", choices=["ls", "show", "export", "import", "verify"])
    p.add_argument("--run_dir", required=True)
    p.add_argument("--user_id", default="", help="show: the user to show.")
    p.add_argument("--to", default="", help="export: a folder; every user's shift and record go into its "
                                            "users.safetensors (the format of save_pretrained).")
    p.add_argument("--from", dest="source", default="",
                   help="import: a folder with a users.safetensors (an export, or a PerFitModel.save_pretrained "
                        "folder) into a run without a store.")
    help = "remove everything stored about a user from a run (its shift and its record)"
    p = sub.add_parser("forget", help=help, description=help)
    p.add_argument("--run_dir", required=True)
    p.add_argument("--user_id", required=True)


def _add_data_parsers(sub) -> None:
    p = sub.add_parser("make-data", help="generate LaMP-format data with known per-user preferences")
    p.add_argument("--task_name", required=True, choices=list(TASKS))
    p.add_argument("--output_dir", required=True)
    run_defaults = {f.name: f for f in dataclasses.fields(RunConfig)}
    for name in ("num_users", "history_per_user", "queries_per_user", "num_other_users", "seed"):
        f = run_defaults[name]  # the same defaults as the data `perfit run` generates
        p.add_argument(f"--{name}", type=int, default=f.default, help=f"{f.metadata['help']} (default: {f.default})")
    p = sub.add_parser("convert-lamp", help="convert official LaMP questions/outputs to the per-user layout")
    p.add_argument("--task_name", required=True, choices=list(TASKS))
    p.add_argument("--questions", required=True)
    p.add_argument("--outputs", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_test_users", type=int, default=0, help="Test users (longest histories). 0: half of the questions, or all with --others_questions.")
    p.add_argument("--others_questions", default="", help="Questions (e.g. the train split) that become user_others.json.")
    p.add_argument("--others_outputs", default="")
    p = sub.add_parser("validate-data", help="validate a per-user data folder and summarize it")
    p.add_argument("--task_name", required=True, choices=list(TASKS))
    p.add_argument("--data_dir", required=True)
    p = sub.add_parser("evaluate", help="score predictions against golds (LaMP metrics), printed as JSON")
    p.add_argument("--task_name", required=True, choices=list(TASKS))
    p.add_argument("--golds_json", required=True)
    p.add_argument("--preds_json", required=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="perfit", description="Personalize a frozen LLM with collective + personal low-rank shifts.")
    sub = ap.add_subparsers(dest="command", required=True)
    # in this order: it is the order `perfit --help` lists the commands in
    for add in (_add_run_parsers, _add_model_parsers, _add_store_parsers, _add_data_parsers):
        add(sub)
    return ap


def _given(args, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def _config(args, cls=RunConfig):
    from .config import load_config_file

    base = load_config_file(args.config, cls) if getattr(args, "config", "") else {}
    return cls(**(base | _given(args, cls)))


def _read_histories(path: str) -> dict[str, list]:
    from .data import DataError
    from .data.schema import read_json

    users = read_json(path, "--history")
    if not isinstance(users, list) or not all(isinstance(u, dict) and isinstance(u.get("user_id"), (str, int))
                                              and isinstance(u.get("profile"), list) for u in users):
        raise DataError([f"--history {path}: expected a list of {{user_id, profile: [history items]}}"])
    return {str(u["user_id"]): u["profile"] for u in users}


def _store_command(args) -> int:
    from .errors import RunStateError
    from .rundir import USERS, load_run_config, run_store
    from .store import UserStore

    if args.action == "import":
        if not args.source:
            raise RunStateError("perfit store import needs --from FOLDER")
        load_run_config(args.run_dir)
        path = os.path.join(args.run_dir, USERS)
        if os.path.exists(path):
            raise RunStateError(f"{path} exists already; import into a run without a store (or move it away first)")
        store = UserStore.import_folder(args.source, path)
        print(json.dumps({"imported": len(store), "store": path}))
        return 0
    store = run_store(args.run_dir)
    if args.action == "ls":
        for uid, e in store.entries().items():
            print(json.dumps({"user_id": uid} | {k: e.get(k) for k in ("items", "final_loss", "trained_at", "stored_at", "bytes")}))
    elif args.action == "show":
        t = store.get(args.user_id) if args.user_id in store else None
        if t is None:
            raise RunStateError(f"user {args.user_id!r} is not in {store.path}")
        print(json.dumps({"user_id": args.user_id, **store.entry(args.user_id),
                          "tensors": {k: list(v.shape) for k, v in t.items()}}, indent=1))
    elif args.action == "export":
        if not args.to:
            raise RunStateError("perfit store export needs --to FOLDER")
        print(json.dumps({"exported": store.export(args.to), "to": args.to}))
    else:
        problems = store.verify()
        print(json.dumps({"users": len(store), "problems": problems}, indent=1))
        return 1 if problems else 0
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 speaks, but for warnings


def _cmd_run(args) -> int:
    from . import pipeline

    res = pipeline.run(_config(args))
    if res is not None:
        print(pipeline.summary_table(res))
        print(f"results: {res['run_dir']}/results.json")
    return 0


def _cmd_stage1(args) -> int:
    from . import pipeline

    out = pipeline.stage1_only(_config(args))
    if not _rank():
        print(out)
    return 0


def _cmd_stage2(args) -> int:
    from . import pipeline

    out = pipeline.stage2_only(_config(args))
    if not _rank():
        print(out)
    return 0


def _cmd_predict(args) -> int:
    from . import pipeline

    if args.run_dir:
        from .config import load_config_file

        given = (load_config_file(args.config, RunConfig) if args.config else {}) | _given(args, RunConfig)
        res = pipeline.predict_only(run_dir=args.run_dir, overrides=given)
    else:
        res = pipeline.predict_only(_config(args))
    print(pipeline.summary_table(res))
    return 0


def _cmd_compare(args) -> int:
    from .compare import compare

    doc = compare(_config(args, CompareConfig))
    print(open(os.path.join(doc["config"]["output_dir"], "comparison.md"), encoding="utf-8").read())
    return 0


def _cmd_generate(args) -> int:
    from .model import PerFitModel

    pm = PerFitModel.from_run(args.run_dir, device=args.device or None)
    out = pm.generate([args.user_id], [args.input], max_new_tokens=args.max_new_tokens or None, raw=args.raw)
    if out.without_personal_shift:
        print(f"perfit: user {args.user_id!r} has no personal shift in {args.run_dir}: the stage-1 shifts answered",
              file=sys.stderr)
    print(out[0])
    return 0


def _cmd_personalize(args) -> int:
    from .model import PerFitModel

    histories = _read_histories(args.history)
    pm = PerFitModel.from_run(args.run_dir, device=args.device or None)
    print(json.dumps(pm.personalize(histories, mode=args.personalize or None), indent=1))
    return 0


def _cmd_serve(args) -> int:
    from .config import check_fields
    from .serve.app import serve

    sc = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    check_fields(sc)
    if sc.engine == "vllm":
        from .vllm_plugin.server import serve_vllm

        return serve_vllm(sc)
    return serve(sc)


def _cmd_tune(args) -> int:
    from .tune import TuneConfig, tune

    doc = tune(_config(args, TuneConfig))
    print(json.dumps({k: doc[k] for k in ("task", "method", "completed")} | {"best": doc.get("best")}, indent=1))
    return 0


def _cmd_analyze(args) -> int:
    from .analyze import analyze_run

    res = analyze_run(args.run_dir, args.output_dir, args.max_users)
    print(json.dumps({k: res[k] for k in ("users", "total", "personal", "cosine_to_collective")
                      if k in res} | {"cosine_to_collective": {k: v for k, v in res["cosine_to_collective"].items()
                                                                if k != "per_user"}}
                     | ({"preference_vs_shift_distance": res["preference_vs_shift_distance"]}
                        if "preference_vs_shift_distance" in res else {}), indent=1))
    return 0


def _cmd_forget(args) -> int:
    from .rundir import forget_user

    print(json.dumps({"user_id": args.user_id, "removed": forget_user(args.run_dir, args.user_id)}))
    return 0


def _cmd_make_data(args) -> int:
    from .data.synthetic import generate

    print(json.dumps(generate(args.task_name, args.output_dir, args.num_users, args.history_per_user,
                              args.queries_per_user, args.num_other_users, args.seed)))
    return 0


def _cmd_convert_lamp(args) -> int:
    from .data.lamp import convert_lamp

    print(json.dumps(convert_lamp(args.task_name, args.questions, args.outputs, args.output_dir,
                                  args.num_test_users, args.others_questions, args.others_outputs)))
    return 0


def _cmd_validate_data(args) -> int:
    from .data import load_task_data, summarize

    td = load_task_data(args.data_dir, args.task_name)
    print(json.dumps(summarize(td, td.iter_others()), indent=1))
    return 0


def _cmd_evaluate(args) -> int:
    from .metrics import evaluate_files

    print(json.dumps(evaluate_files(args.task_name, args.golds_json, args.preds_json)))
    return 0


# command -> its handler, which returns the exit code (a PerFitError raised in it: 2)
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run, "stage1": _cmd_stage1, "stage2": _cmd_stage2, "predict": _cmd_predict, "compare": _cmd_compare,
    "generate": _cmd_generate, "personalize": _cmd_personalize, "serve": _cmd_serve, "tune": _cmd_tune,
    "analyze": _cmd_analyze, "store": _store_command, "forget": _cmd_forget, "make-data": _cmd_make_data,
    "convert-lamp": _cmd_convert_lamp, "validate-data": _cmd_validate_data, "evaluate": _cmd_evaluate,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = _rank()
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) or rank else logging.INFO,
                        format=f"[perfit{f' rank {rank}' if rank else ''}] %(message)s", stream=sys.stderr)
    if args.command in RUN_COMMANDS:
        # torch comes in here (pipeline before dist.setup, as ever): the data commands run without it
        from . import dist, pipeline  # noqa: F401

        if args.command == "predict" and rank:
            return 0  # predicting is rank 0's work
        dist.setup()
    try:
        code = COMMANDS[args.command](args)
    except PerFitError as e:
        print(user_message(e), file=sys.stderr)
        return 2
    if args.command in RUN_COMMANDS:
        dist.teardown()
    return code


if __name__ == "__main__":
    sys.exit(main())
