"""The house rule, checked: lower layers never import upper ones, and the data layer does not import torch."""
import ast
import os

import perfit

ROOT = os.path.dirname(perfit.__file__)
LOWER = ("method", "backbone", "data", "prompts", "metrics", "tasks", "config", "store", "batching", "prefix")
UPPER = ("train", "model", "pipeline", "serve", "cli", "compare", "tune", "analyze", "vllm_plugin", "baselines")


def _modules(name):
    path = os.path.join(ROOT, name)
    if os.path.isdir(path):
        return [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith(".py")]
    return [path + ".py"]


def _imports(path):
    """The perfit modules a file imports (top level of the package), wherever in the file the import is."""
    pkg = os.path.relpath(os.path.dirname(path), os.path.dirname(ROOT)).split(os.sep)  # e.g. ["perfit", "method"]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
            elif node.module and node.module.startswith("perfit."):
                names = [node.module.split(".")[1]]
            else:
                continue
            out.update(names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("perfit."))
    return out


def test_lower_layers_never_import_upper_ones():
    bad = {}
    for name in LOWER:
        for path in _modules(name):
            up = _imports(path) & set(UPPER)
            if up:
                bad[os.path.relpath(path, ROOT)] = sorted(up)
    assert bad == {}


def test_the_data_layer_does_not_import_torch():
    for name in ("data", "metrics"):
        for path in _modules(name):
            tree = ast.parse(open(path, encoding="utf-8").read())
            mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
                   {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
            assert not any(m == "torch" or m.startswith("torch.") for m in mods), path
