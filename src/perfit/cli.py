"""The `perfit` command: parses flags and calls library functions; no logic of its own."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from .config import CompareConfig, RunConfig
from .tasks import TASKS

RUN_COMMANDS = {
    "run": "the whole pipeline: stage 1, stage 2, predictions and metrics for zero_shot, stage1 and perfit",
    "stage1": "train (or reuse) the collective shift only",
    "stage2": "train the personal shifts into the user store (needs the stage-1 checkpoint)",
    "predict": "predict and evaluate from a stored stage-1 checkpoint and user store",
}


def _add_config_flags(p: argparse.ArgumentParser, cls=RunConfig) -> None:
    for f in dataclasses.fields(cls):
        typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
        kw = {"choices": list(TASKS)} if f.name == "task_name" else {}
        p.add_argument(f"--{f.name}", type=typ, default=f.default, help=f"{f.metadata['help']} (default: {f.default!r})", **kw)
    p.add_argument("-q", "--quiet", action="store_true", help="Only warnings and the final summary.")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="perfit", description="Personalize a frozen LLM with collective + personal low-rank shifts.")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, help in RUN_COMMANDS.items():
        _add_config_flags(sub.add_parser(name, help=help, description=help))
    help = "run PerFit and its peers (OPPU, task LoRA, RAG, ...) on the same users; writes comparison.{json,md,png}"
    _add_config_flags(sub.add_parser("compare", help=help, description=help), CompareConfig)
    p = sub.add_parser("make-data", help="generate LaMP-format data with known per-user preferences")
    p.add_argument("--task_name", required=True, choices=list(TASKS))
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_users", type=int, default=20)
    p.add_argument("--history_per_user", type=int, default=20)
    p.add_argument("--queries_per_user", type=int, default=5)
    p.add_argument("--num_other_users", type=int, default=12)
    p.add_argument("--seed", type=int, default=42)
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
    return ap


def _config(args, cls=RunConfig):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="[perfit] %(message)s", stream=sys.stderr)
    from . import pipeline
    from .data import DataError, load_task_data, summarize

    try:
        if args.command == "run":
            res = pipeline.run(_config(args))
            print(pipeline.summary_table(res))
            print(f"results: {res['run_dir']}/results.json")
        elif args.command == "stage1":
            print(pipeline.stage1_only(_config(args)))
        elif args.command == "stage2":
            print(pipeline.stage2_only(_config(args)))
        elif args.command == "predict":
            print(pipeline.summary_table(pipeline.predict_only(_config(args))))
        elif args.command == "compare":
            from .compare import compare

            doc = compare(_config(args, CompareConfig))
            print(open(os.path.join(doc["config"]["output_dir"], "comparison.md"), encoding="utf-8").read())
        elif args.command == "make-data":
            from .data.synthetic import generate

            print(json.dumps(generate(args.task_name, args.output_dir, args.num_users, args.history_per_user,
                                      args.queries_per_user, args.num_other_users, args.seed)))
        elif args.command == "convert-lamp":
            from .data.lamp import convert_lamp

            print(json.dumps(convert_lamp(args.task_name, args.questions, args.outputs, args.output_dir,
                                          args.num_test_users, args.others_questions, args.others_outputs)))
        elif args.command == "validate-data":
            td = load_task_data(args.data_dir, args.task_name)
            print(json.dumps(summarize(td, list(td.iter_others())), indent=1))
        elif args.command == "evaluate":
            from .metrics import evaluate_files

            print(json.dumps(evaluate_files(args.task_name, args.golds_json, args.preds_json)))
    except DataError as e:
        print(f"perfit: invalid data:\n{e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"perfit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
