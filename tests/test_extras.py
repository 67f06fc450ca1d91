"""Dependencies by use: the core runs without the extras (serve, tune, plot) and without vLLM, a command that needs a
missing extra names it, and the vLLM plugin refuses a vLLM outside the range it is tested on. The extras' absence is
simulated in a fresh interpreter whose imports of them fail, so nothing is uninstalled."""
import json
import os
import re
import subprocess
import sys
import textwrap
import types

import pytest

from perfit.errors import ConfigError

BLOCKED = ("fastapi", "uvicorn", "starlette", "prometheus_client", "pydantic", "optuna", "matplotlib", "vllm")

# first in the child: every import of a blocked package (and find_spec of one) fails as for a package not installed
BLOCK = textwrap.dedent(f"""
    import sys
    BLOCKED = {BLOCKED!r}

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
""")


def run_blocked(code: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code), *args], capture_output=True, text=True,
                       timeout=300, env=env, cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


CORE = """
    import contextlib, io, json, logging, os, sys
    import torch

    torch.set_num_threads(1)
    import perfit, perfit.cli, perfit.model, perfit.pipeline
    from perfit.data.synthetic import generate
    from perfit.testing import tiny_llama, tiny_tokenizer

    d = sys.argv[1]
    model = os.path.join(d, "model")
    tiny_llama(num_layers=4, hidden=64, vocab=260, seed=1).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    generate("movie_tagging", os.path.join(d, "data"), num_users=2, history_per_user=2, queries_per_user=1,
             num_other_users=1, seed=0)

    def cli(*argv):
        logging.root.handlers.clear()  # main's basicConfig then logs to this call's stderr
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = perfit.cli.main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    res = {}
    res["run"] = cli("run", "--task_name", "movie_tagging", "--model_name", "tiny", "--model_path", model,
                     "--data_dir", os.path.join(d, "data"), "--output_dir", os.path.join(d, "out"), "--preset", "paper",
                     "--intervene_layer", "1;2", "--low_rank_dimension", "4", "--user_low_rank_dimension", "2",
                     "--max_epoch", "1", "--batch_size", "4", "--max_length", "512", "--user_group_size", "2", "-q")
    run = os.path.join(d, "out", "movie_tagging", "latest")
    pm = perfit.PerFitModel.from_run(run, device="cpu")
    users = pm.store.users()
    res["users"] = users
    res["generated"] = list(pm.generate(users, ["a heist movie", "a space opera"], max_new_tokens=4))
    res["generate_cli"] = cli("generate", "--run_dir", run, "--user_id", users[0], "--input", "a heist movie",
                              "--max_new_tokens", "4", "--device", "cpu")
    # the library path: shifts saved, loaded with from_pretrained, on the Hugging Face model's own generate
    from transformers import AutoModelForCausalLM
    from perfit.method import PerFitShifts
    pm.save_pretrained(os.path.join(d, "saved"), users[:1])
    shifts = PerFitShifts.from_pretrained(os.path.join(d, "saved"))
    hf = AutoModelForCausalLM.from_pretrained(model).eval()
    ids = __import__("torch").tensor([pm.prompt_ids(["a heist movie"])[0]])
    with shifts.applied(hf, users[:1]):
        res["hf_generated"] = hf.generate(input_ids=ids, max_new_tokens=4, do_sample=False,
                                          pad_token_id=pm.tok.pad_token_id)[0, ids.shape[1]:].tolist()
    from perfit.generate import Completion
    res["pm_tokens"] = pm.complete([Completion(users[0], ids[0].tolist(), 4)])[0].tokens
    res["analyze"] = cli("analyze", "--run_dir", run, "--output_dir", os.path.join(d, "analysis"))
    res["analysis_files"] = sorted(os.listdir(os.path.join(d, "analysis")))
    res["serve"] = cli("serve", "--run_dir", run)
    res["tune"] = cli("tune", "--task_name", "movie_tagging", "--data_dir", os.path.join(d, "data"),
                      "--output_dir", os.path.join(d, "tune"))
    res["loaded"] = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print("RESULT " + json.dumps(res))
"""


def test_core_runs_without_the_extras(tmp_path):
    """`perfit run`, generation through PerFitModel and `perfit generate`, shifts saved and loaded with
    from_pretrained on the Hugging Face model's own generate, and `perfit analyze` (its JSON; the plot is
    skipped) work with none of the extras importable; `perfit serve` and `perfit tune` stop at once, naming their
    extra, with the CLI's one-line error and exit code 2."""
    p = run_blocked(CORE, str(tmp_path), cwd=str(tmp_path))
    res = json.loads(p.stdout.split("RESULT ", 1)[1])
    rc, out, err = res["run"]
    assert rc == 0 and "movie_tagging: zero_shot" in out, err
    assert len(res["users"]) == 2 and len(res["generated"]) == 2
    assert all(isinstance(g, str) for g in res["generated"])
    assert res["pm_tokens"] and res["hf_generated"][: len(res["pm_tokens"])] == res["pm_tokens"]  # from_pretrained + generate
    rc, out, err = res["generate_cli"]
    assert rc == 0 and out.strip() == res["generated"][0].strip(), (out, res["generated"], err)
    rc, out, err = res["analyze"]
    assert rc == 0 and json.loads(out)["users"] == 2, err
    assert res["analysis_files"] == ["analysis.json"]
    assert "analysis.png not written" in err and "pip install 'perfit[plot]'" in err
    rc, out, err = res["serve"]
    assert rc == 2 and err.strip().splitlines() == [
        "perfit: perfit serve needs the server extra (fastapi, uvicorn, prometheus_client, pydantic not installed): "
        "pip install 'perfit[serve]'"], err
    rc, out, err = res["tune"]
    assert rc == 2 and "perfit tune needs the tuning extra (optuna not installed): pip install 'perfit[tune]'" in err
    assert "Traceback" not in err
    assert res["loaded"] == []


def test_the_serve_package_names_its_extra_when_fastapi_alone_is_missing():
    """The library path too: importing the server without fastapi is an ImportError (a PerFitError as well) that
    names the extra, before any submodule's own import of fastapi fails."""
    code = """
        BLOCKED = ("fastapi",)
        from perfit.errors import PerFitError
        try:
            import perfit.serve.app  # noqa: F401
        except ImportError as e:
            assert isinstance(e, PerFitError), type(e)
            print("MESSAGE " + str(e))
        else:
            raise AssertionError("imported without fastapi")
    """
    p = run_blocked(code)
    assert p.stdout.split("MESSAGE ", 1)[1].strip() == (
        "perfit serve needs the server extra (fastapi not installed): pip install 'perfit[serve]'")


def test_require_passes_with_the_extras_installed():
    from perfit import extras

    for name in extras.EXTRAS:
        extras.require(name, f"the {name} test")  # this venv has every extra (scripts/setup.sh)


# ------------------------------------------------------------------ the vLLM version the plugin supports

@pytest.mark.parametrize("version", ["0.32.0", "0.32.3", "0.32.0+cpu", "0.32.1.dev12+gabcdef"])
def test_vllm_versions_of_the_supported_minor_release_pass(version):
    from perfit.vllm_plugin import check_vllm_version

    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "0.33.0rc1", "1.32.0", "0.320.0", "dev", ""])
def test_other_vllm_versions_are_refused_naming_the_range(version):
    from perfit.vllm_plugin import check_vllm_version

    with pytest.raises(ConfigError, match=re.escape("supports vllm>=0.32,<0.33")):
        check_vllm_version(version)


def test_register_refuses_another_vllm_before_patching(monkeypatch, tmp_path):
    """vLLM calls register() in each of its processes: with a run to serve and another vLLM version it stops there,
    before touching vLLM (the run is not even read); without a run it stays inert whatever the version."""
    import perfit.vllm_plugin as plugin

    monkeypatch.setitem(sys.modules, "vllm.version", types.SimpleNamespace(__version__="0.34.1"))
    assert plugin.vllm_version() == "0.34.1"  # the running vLLM's own version, when it is imported
    monkeypatch.setattr(plugin.RunInfo, "load", lambda *a: pytest.fail("the run was read"))
    monkeypatch.delenv(plugin.ENV_RUN_DIR, raising=False)
    assert plugin.register() is None
    monkeypatch.setenv(plugin.ENV_RUN_DIR, str(tmp_path))
    with pytest.raises(ConfigError, match=re.escape("supports vllm>=0.32,<0.33, not vLLM 0.34.1")):
        plugin.register()


def test_serve_engine_vllm_refuses_another_vllm_before_starting_it(monkeypatch):
    pytest.importorskip("fastapi")
    import importlib.util

    import perfit.vllm_plugin as plugin
    from perfit.config import ServeConfig
    from perfit.vllm_plugin.server import vllm_command

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    monkeypatch.setattr(plugin, "vllm_version", lambda: "0.40.0")
    with pytest.raises(ConfigError, match=re.escape("vllm>=0.32,<0.33, not vLLM 0.40.0")):
        vllm_command(ServeConfig(run_dir="no-such-run", engine="vllm"))


def test_the_vllm_extra_pins_the_supported_range_and_the_core_needs_no_extra():
    tomllib = pytest.importorskip("tomllib")
    from perfit.vllm_plugin import VLLM_RANGE

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert f"vllm{VLLM_RANGE}" in project["optional-dependencies"]["vllm"]
    heavy = {"fastapi", "uvicorn", "prometheus-client", "pydantic", "optuna", "matplotlib", "vllm"}
    assert not [d for d in project["dependencies"] if re.split(r"[<>=!~\[ ;]", d)[0] in heavy]
