"""`perfit analyze`: what the shifts learned, on any run (the paper's hypothesis: users' shifts share a low-rank,
mostly one-dimensional structure, with the collective shift as its common part).

For each test user with a stored shift, the mean change its shift makes to the hidden state at the shifted layers
and positions over its own queries (collective + personal, and personal alone), the layers concatenated into one
vector. Stacked over users: singular values and the variance explained by the top k directions; each user's cosine
to the collective direction; users in the plane of the top two directions, coloured by their most frequent history
label; on generated data (whose manifest holds the true preferences) the rank correlation between users' preference
distance and their personal shifts' distance."""
from __future__ import annotations

import json
import logging
import os
from collections import Counter

import torch

from .batching import make_batch
from .data import atomic_path, write_json_atomic
from .errors import RunStateError
from .model import PerFitModel
from .prefix import capture_layer_outputs
from .method.shifts import Shifter, ShiftState

log = logging.getLogger("perfit")


@torch.no_grad()
def shift_vectors(pm: PerFitModel, queries_of: dict[str, list[str]], batch_size: int = 16) -> dict:
    """{"users", "total": [U, L*d], "personal": [U, L*d], "collective": [L*d]}: each user's mean shift over its queries
    (users without a stored shift are left out), and the collective shift's own mean over all of them."""
    users = [u for u in queries_of if pm.has_user(u) and queries_of[u]]
    layers, device = pm.collective.layers, pm.device
    total, personal, coll_sum, coll_n = [], [], 0.0, 0
    for u in users:
        sh: Shifter = pm.collective.spawn(1)
        sh.load_user_state(0, {k: v.to(device) for k, v in pm.store.get(u).items()})
        prompts = pm.prompt_ids(queries_of[u])
        sums = {k: [0.0] * len(layers) for k in ("total", "personal", "collective")}
        n = 0
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s: s + batch_size]
            b = make_batch(chunk, [len(p) for p in chunk], [0] * len(chunk), pm.tok.pad_token_id, pm.first, pm.last).to(device)
            state = ShiftState(b.shift_index, b.shift_valid, b.users, b.input_ids.shape[1])
            with capture_layer_outputs(pm.model, layers) as out, sh.attached(pm.model), sh.active(state):
                pm.model.get_decoder()(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                                       use_cache=False)
            valid = b.shift_valid.unsqueeze(-1)
            for i, l in enumerate(layers):
                h = out[l].gather(1, b.shift_index.unsqueeze(-1).expand(-1, -1, out[l].shape[-1]))
                p = sh.personal[str(l)].delta(h, b.users)
                c = sh.collective[str(l)].delta(h) if str(l) in sh.collective else torch.zeros_like(p)
                sums["personal"][i] = sums["personal"][i] + (p * valid).sum((0, 1))
                sums["collective"][i] = sums["collective"][i] + (c * valid).sum((0, 1))
                sums["total"][i] = sums["total"][i] + ((p + c) * valid).sum((0, 1))
            n += int(b.shift_valid.sum())
        total.append(torch.cat([t / n for t in sums["total"]]).double().cpu())
        personal.append(torch.cat([t / n for t in sums["personal"]]).double().cpu())
        coll_sum = coll_sum + torch.cat(sums["collective"]).double().cpu()
        coll_n += n
    if not users:
        raise RunStateError(f"{pm.run_dir}: none of these {len(queries_of)} test users has a stored shift; run "
                            f"`perfit stage2` (or `perfit run`) first")
    return {"users": users, "total": torch.stack(total), "personal": torch.stack(personal), "collective": coll_sum / coll_n}


def spectrum(M: torch.Tensor, k: int = 10) -> dict:
    """Singular values of the stacked user vectors (not centred: a shared direction is part of the structure) and the
    cumulative share of the squared norm the top directions explain."""
    s = torch.linalg.svdvals(M.double())
    var = s**2 / (s**2).sum().clamp_min(1e-300)
    return {"singular_values": s[:k].tolist(), "explained": var[:k].tolist(), "cumulative": var.cumsum(0)[:k].tolist()}


def preference_distance(a: dict, b: dict) -> float:
    """Between two users of the generated data's manifest: Spearman's footrule between their preference orders
    (labels, citation fields), the difference of their rating biases, or the number of style traits that differ
    (headlines, titles, tweets)."""
    if "preference" in a:
        ra, rb = {l: i for i, l in enumerate(a["preference"])}, {l: i for i, l in enumerate(b["preference"])}
        return float(sum(abs(ra[l] - rb[l]) for l in ra))
    if "bias" in a:
        return float(abs(a["bias"] - b["bias"]))
    traits = a.get("style", {k: v for k, v in a.items() if k != "test"})
    other = b.get("style", {k: v for k, v in b.items() if k != "test"})
    return float(sum(traits[k] != other[k] for k in traits))


def analyze(pm: PerFitModel, users, output_dir: str, manifest: dict | None = None) -> dict:
    """`users`: the run's test users (their queries and history). Writes analysis.json and analysis.png."""
    vec = shift_vectors(pm, {u.user_id: [q.input for q in u.query] for u in users})
    by_id = {u.user_id: u for u in users}
    c = vec["collective"]
    cos = torch.nn.functional.cosine_similarity(vec["total"], c.unsqueeze(0).expand_as(vec["total"]), dim=1)
    task = pm.task
    label_of = {}
    for uid in vec["users"]:
        items = by_id[uid].profile
        label_of[uid] = Counter(str(it[task.target_field]) for it in items).most_common(1)[0][0] \
            if task.has_labels and task.labelled_items else ""
    res = {"task": task.name, "run_dir": pm.run_dir, "users": len(vec["users"]), "layers": pm.collective.layers,
           "total": spectrum(vec["total"]), "personal": spectrum(vec["personal"]),
           "cosine_to_collective": {"mean": float(cos.mean()), "min": float(cos.min()), "max": float(cos.max()),
                                    "per_user": dict(zip(vec["users"], map(float, cos)))},
           "norms": {"collective": float(c.norm()), "personal_mean": float(vec["personal"].norm(dim=1).mean()),
                     "total_mean": float(vec["total"].norm(dim=1).mean())}}
    if manifest is not None and len(vec["users"]) >= 3:
        from scipy.stats import spearmanr

        pref, dist = [], []
        U = vec["users"]
        for i in range(len(U)):
            for j in range(i + 1, len(U)):
                pref.append(preference_distance(manifest["users"][U[i]], manifest["users"][U[j]]))
                dist.append(float((vec["personal"][i] - vec["personal"][j]).norm()))
        rho, p = spearmanr(pref, dist)
        res["preference_vs_shift_distance"] = {"spearman": float(rho), "p_value": float(p), "pairs": len(pref)}
    os.makedirs(output_dir, exist_ok=True)
    write_json_atomic(os.path.join(output_dir, "analysis.json"), res)
    _plot(res, vec, cos, [label_of[u] for u in vec["users"]], os.path.join(output_dir, "analysis.png"))
    return res


def _plot(res: dict, vec: dict, cos: torch.Tensor, labels: list[str], path: str) -> None:
    from .extras import pyplot

    plt = pyplot(path)
    if plt is None:
        return

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    for key, colour in (("total", "tab:red"), ("personal", "tab:blue")):
        cum = res[key]["cumulative"]
        ax[0].plot(range(1, len(cum) + 1), cum, "o-", color=colour, label=f"{key} (top 1: {cum[0]:.0%})")
    ax[0].set(xlabel="top k directions", ylabel="share of squared norm", ylim=(0, 1.02), title="how many directions")
    ax[0].legend()
    ax[1].hist(cos.numpy(), bins=20, color="tab:gray")
    ax[1].set(xlabel="cosine to the collective shift", ylabel="users", title="shared part")
    _, _, vh = torch.linalg.svd(vec["total"], full_matrices=False)
    xy = vec["total"] @ vh[:2].T
    kinds = sorted(set(labels))
    cmap = plt.get_cmap("tab20")
    for k, lab in enumerate(kinds):
        pts = xy[[i for i, l in enumerate(labels) if l == lab]]
        ax[2].scatter(pts[:, 0], pts[:, 1], s=18, color=cmap(k % 20), label=lab or "users")
    ax[2].set(xlabel="direction 1", ylabel="direction 2", title="users (colour: most frequent label)")
    if 1 < len(kinds) <= 12:
        ax[2].legend(fontsize=6, loc="best")
    fig.suptitle(f"{res['task']}: {res['users']} users' shifts, layers {res['layers']}")
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def analyze_run(run_dir: str, output_dir: str, max_users: int = 0) -> dict:
    """`perfit analyze`: the run's own settings and test data."""
    from . import pipeline
    from .data.synthetic import MANIFEST_FILE

    pm = PerFitModel.from_run(run_dir)
    exp = pipeline.prepare(pm.cfg, run_dir)
    users = exp.data.test_users[:max_users] if max_users > 0 else exp.data.test_users
    mpath = os.path.join(exp.data.data_dir, pm.cfg.task_name, MANIFEST_FILE)
    manifest = json.load(open(mpath, encoding="utf-8")) if os.path.isfile(mpath) else None
    return analyze(pm, users, output_dir, manifest)
