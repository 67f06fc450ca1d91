"""PerFit's shift against pyreft's LoreftIntervention on the same parameters (skips when pyreft is absent).

pyreft is installed without its dependencies (`pip install --no-deps pyreft==0.1.0 pyvene==0.1.8`, see
scripts/setup.sh): its trainer needs transformers 4.45, but the intervention module needs only pyvene."""
import importlib.util
import os

import pytest
import torch

from perfit.method.shifts import LowRankShift


def _loreft_class():
    spec = importlib.util.find_spec("pyreft")
    if spec is None or importlib.util.find_spec("pyvene") is None:
        pytest.skip("pyreft / pyvene not installed")
    # load pyreft/interventions.py alone: pyreft/__init__ imports its trainer, which needs `datasets`
    path = os.path.join(os.path.dirname(spec.origin), "interventions.py")
    s = importlib.util.spec_from_file_location("_pyreft_interventions", path)
    mod = importlib.util.module_from_spec(s)
    try:
        s.loader.exec_module(mod)
    except ImportError as e:
        pytest.skip(f"pyreft's interventions do not import here: {e}")
    return mod.LoreftIntervention


@pytest.mark.parametrize("rank", [1, 4])
def test_shift_equals_pyreft_loreft(rank):
    Loreft = _loreft_class()
    torch.manual_seed(0)
    d = 32
    ref = Loreft(embed_dim=d, low_rank_dimension=rank, dtype=torch.float32)
    ours = LowRankShift(1, d, rank)
    with torch.no_grad():
        Rt = ref.rotate_layer.weight.detach()  # [d, r], orthonormal columns: our R^T
        ours.rotate_raw[0].copy_(Rt)
        ours.weight[0].copy_(ref.learned_source.weight)
        ours.bias[0].copy_(ref.learned_source.bias)
    torch.testing.assert_close(ours.rotation()[0], Rt.T, rtol=1e-5, atol=1e-6)  # an orthonormal R maps to itself
    h = torch.randn(3, 5, d)
    with torch.no_grad():
        expect = ref(h)
        got = h + ours.delta(h)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    # and the gradients with respect to W and b agree
    h2 = torch.randn(2, 4, d)
    ref(h2).square().sum().backward()
    (h2 + ours.delta(h2)).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad[0], ref.learned_source.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad[0], ref.learned_source.bias.grad, rtol=1e-4, atol=1e-4)
