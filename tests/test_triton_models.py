"""Every family on the fused Triton kernels gives the reference's logits and gradients.

The kernel tests (tests/test_triton_na.py, tests/test_triton_routed.py) check the ops; this checks
how the models use them (bias tables, scales, padding, per-window carrier tokens, routing) in a
user's terms: build a model by name, run a batch forward and backward on each backend, compare.
fp32, eval mode (no stochastic depth), a random classifier (the heads start at zero).
* On the CPU through Triton's interpreter, at the smallest inputs that still reach each family's
  attention, in the TRITON_INTERPRET=1 run of ``test_interpreter_suite`` (tests/triton_harness.py).
  The interpreter's cost is per kernel program, so there each model keeps at most two blocks a
  stage (``shallow``, the config a user would write: ``base`` and the stage depths). A stage's
  blocks differ only in patterns that alternate (Swin's shift, GC-ViT's local and global
  attention, DiNAT's dilations), and its first two blocks hold every pattern (DiNAT's first stage
  keeps its three, which its dilations name one by one): more blocks repeat the same kernel
  calls. With all their blocks GC-ViT-XXT, FasterViT-0, DiNAT-Mini and BiFormer-T took 186 to
  194 s each and the nine families 608 s with ``-n 2``; shallow, 354 s (2-core machine).
* On a GPU at 224 px (``@pytest.mark.gpu``), TF32 off.
"""

import pytest
import timm
import torch

import zoo
from triton_harness import gpu, interpreter_suite, needs_interpreter
from zoo.config import load_config
from zoo.kernels import backend

pytest.importorskip("zoo.kernels.triton_na")

# Smallest variant of each family and the input size of its CPU run. FasterViT needs 128 px: its
# third stage then pads to 2 x 2 windows, so carrier tokens exist (one window gets none).
FAMILIES = {"zoo_nat_mini": 64, "zoo_dinat_mini": 64, "zoo_swin_tiny": 64,
            "zoo_cswin_tiny": 64, "zoo_litv2_small": 64, "zoo_maxvit_tiny": 64,
            "zoo_gcvit_xxtiny": 64, "zoo_biformer_tiny": 64, "zoo_fastervit_0": 128}


KEEP_DEPTH = {"zoo_dinat_mini": {0: 3}}  # dilation: [1, 8, 1], one value per block


def shallow(name: str) -> dict:
    """The config of ``name`` with at most two blocks a stage (``KEEP_DEPTH`` excepted)."""
    depths = [min(stage.depth, 2) for stage in load_config(name).stages]
    for index, depth in KEEP_DEPTH.get(name, {}).items():
        depths[index] = depth
    return {"base": name.removeprefix("zoo_"),
            "model": {"stages": [{"depth": depth} for depth in depths]}}


def forward_backward(model, x, name):
    model.zero_grad()
    with backend(name):
        out = model(x)
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None}


def compare_backends(name, size, device, tol, config=None):
    """``config``: build this config instead of the registered ``name``."""
    torch.manual_seed(0)
    model = timm.create_model(name) if config is None else zoo.create_model(config)
    model = model.eval().to(device)
    torch.nn.init.normal_(model.get_classifier().weight, std=0.02)
    x = torch.randn(1 if device == "cpu" else 2, 3, size, size, device=device)
    ref, ref_grads = forward_backward(model, x, "reference")
    out, grads = forward_backward(model, x, "triton")
    err = (out - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"{name} logits: max error {err:.3g}"
    assert grads.keys() == ref_grads.keys()
    for param, want in ref_grads.items():
        err = (grads[param] - want).abs().max().item()
        bound = tol * max(want.abs().max().item(), 1e-3)
        assert err <= bound, f"{name} grad of {param}: max error {err:.3g} > {bound:.3g}"


@needs_interpreter
@pytest.mark.parametrize("name", FAMILIES)
def test_family_on_triton_matches_reference(name):
    compare_backends(name, FAMILIES[name], "cpu", tol=1e-4, config=shallow(name))


@gpu
@pytest.mark.parametrize("name", FAMILIES)
def test_family_on_triton_matches_reference_gpu(name, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    compare_backends(name, 224, "cuda", tol=1e-3)


test_interpreter_suite = interpreter_suite(__file__, min_passed=len(FAMILIES), shards=3)
