"""The report of a comparison: comparison.json, comparison.md (the primary metric with its standard error, each row's
paired difference from a reference method on the same queries) and comparison.png (quality against per-user cost)."""
from __future__ import annotations

import math
import os

from . import metrics
from .config import CompareConfig, to_dict
from .data import atomic_path, write_json_atomic


def default_reference(task) -> str:
    """The method others are measured against when none is named: the no-model per-user baseline where answers
    come from a closed set (labels, scores), the frozen model for free text."""
    return "user_majority" if task.has_labels else "zero_shot"


def _reference(cfg: CompareConfig, task, records: dict) -> str | None:
    if cfg.reference:
        return cfg.reference
    ref = default_reference(task)
    return ref if ref in records and len(records) > 1 else None


def write_report(cfg: CompareConfig, records: dict, exp) -> dict:
    """comparison.{json,md,png}. The primary metric carries its standard error over queries; with a reference
    method, each row also gets its paired difference from it on the same queries (a difference is real when it
    exceeds about twice its standard error)."""
    out = cfg.output_dir
    task = exp.data.task
    keys = metrics.report_keys(task)
    ref = _reference(cfg, task, records)
    table = {m: {k: v for k, v in r.items() if k not in ("predictions", "key")} for m, r in records.items()}
    if ref:
        for m, r in records.items():
            if m != ref:
                table[m]["vs_reference"] = {"reference": ref, **metrics.paired_difference(
                    task, exp.golds, r["predictions"], records[ref]["predictions"])}
    doc = {"task": cfg.task_name, "data_dir": cfg.data_dir or "(generated)", "model": cfg.model_path or cfg.model_name,
           "methods": table, "config": to_dict(cfg)}
    write_json_atomic(os.path.join(out, "comparison.json"), doc)
    any_rec = next(iter(records.values()))
    device = next((r["device"] for r in records.values() if "no model" not in r["device"]), "cpu")
    vs = [f"{keys[0]} − {ref}"] if ref else []
    lines = [f"**{cfg.task_name}**: {any_rec['users']} users, {any_rec['queries']} queries, model {doc['model']}, "
             f"device {device}. ± is one standard error over queries" + (f"; `{ref}` is the reference of the paired "
             "differences." if ref else ".") + (f" {keys[0]}: lower is better." if task.lower_is_better else ""), "",
             f"| method | {' | '.join([keys[0] + ' ± se'] + keys[1:] + vs)} | params / user | params shared | bytes / user "
             "| train s shared | train s / user | gen s / query | peak MiB |", "|---|" + "---:|" * (len(keys) + len(vs) + 7)]
    for m, r in records.items():
        mt = r["metrics"]
        cells = [f"{mt[keys[0]]:.3f} ± {mt.get(keys[0] + '_se', float('nan')):.3f}"] + [f"{mt[k]:.3f}" for k in keys[1:]]
        if ref:
            d = table[m].get("vs_reference")
            cells.append(f"{d['diff']:+.3f} ± {d['se']:.3f}" if d else "(reference)")
        lines.append(f"| {m} | " + " | ".join(cells)
                     + f" | {r['params_per_user']:,} | {r['params_shared']:,} | {int(r['bytes_per_user']):,} | {r['train_seconds_shared']:.1f}"
                     f" | {r['train_seconds_per_user']:.2f} | {r['generate_seconds_per_query']:.3f} | {r['peak_memory_mib']:.0f} |")
    with atomic_path(os.path.join(out, "comparison.md"), ".md") as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    plot(records, keys[0], os.path.join(out, "comparison.png"), f"{cfg.task_name}: {any_rec['users']} users")
    return doc


def plot(records: dict, metric: str, path: str, title: str) -> None:
    """Quality against per-user cost (training seconds, bytes stored), one labelled point per method."""
    from .extras import pyplot

    plt = pyplot(path)
    if plt is None:
        return

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, (field, label) in zip(axes, (("train_seconds_per_user", "training seconds per user"),
                                         ("bytes_per_user", "bytes stored per user"))):
        at: dict = {}  # methods on the same spot share one label
        for m, r in records.items():
            at.setdefault((r[field], r["metrics"][metric]), []).append(m)
        for (x, y), ms in at.items():
            ax.scatter([x], [y], s=60, color="tab:red" if any(m.startswith("perfit") for m in ms) else "tab:blue")
            ax.annotate(", ".join(ms), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        thresh = 1.0 if field == "train_seconds_per_user" else 1000.0
        ax.set_xscale("symlog", linthresh=thresh)
        ax.margins(x=0.15, y=0.08)  # room for the labels of the outermost points
        top = max([r[field] for r in records.values()] + [thresh])
        ax.set_xticks([0.0] + [thresh * 10**k for k in range(0, int(math.log10(top / thresh)) + 2)])
        ax.set_xlabel(label + " (0 = none)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    fig.suptitle(f"{title}: {metric} against per-user cost (red: PerFit)")
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
