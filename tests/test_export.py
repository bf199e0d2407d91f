"""Every family exports with torch.export, torch.jit.trace and to ONNX at a fixed image size and
any batch size, and onnxruntime agrees with PyTorch (fp32, atol 1e-4). Reduced-width configs (tests/configs/tiny_*.yaml) keep CI cheap;
the input is non-square and not a multiple of any window, so the padding paths are exported too."""
import warnings
from pathlib import Path

import pytest
import timm
import torch

import zoo
from zoo.export import check_onnx, export_onnx, export_program

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CONFIGS = Path(__file__).parent / "configs"
# Adding a family is one entry here (and its tests/configs/tiny_<family>.yaml).
FAMILIES = ["nat", "dinat", "swin", "cswin", "litv2", "biformer", "maxvit", "gcvit", "fastervit"]
SIZE = (64, 96)


def _model(family):
    torch.manual_seed(0)
    model = zoo.create_model(CONFIGS / f"tiny_{family}.yaml", num_classes=10).eval()
    # Random, non-trivial values where the init leaves zeros or identities (BatchNorm statistics,
    # LITv2's zero-initialised deformable offsets) so the export is checked on every path.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            if hasattr(m, "conv_offset"):
                m.conv_offset.weight.normal_(0, 0.3)
                m.conv_offset.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_export_torch_and_onnx(family, tmp_path):
    model = _model(family)
    x = torch.randn(3, 3, *SIZE)  # traced at batch 2, so 3 proves the batch axis free
    program = export_program(model, SIZE)
    with torch.no_grad():
        want = model(x)
        assert (program.module()(x) - want).abs().max().item() < 1e-5
        with warnings.catch_warnings():  # of every size it freezes, and that it is deprecated
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model, x)  # what timm's (TorchScript) onnx_export runs
        assert (traced(x) - want).abs().max().item() < 1e-5
    path = export_onnx(program, tmp_path / f"{family}.onnx")  # from the program: traced once
    for batch in (x[:2], x, x[:1]):  # the traced batch size and others
        diff, out = check_onnx(model, path, batch)
        print(f"{family}: onnxruntime vs PyTorch max |diff| {diff:.2e} at batch {len(batch)}")
        assert out.shape == (len(batch), 10)
        assert diff < 1e-4, f"{family}: onnxruntime differs from PyTorch by {diff:.2e}"


def test_export_in_half_precision(tmp_path):
    """A float16 model exports and checks with float16 inputs; bfloat16, which onnxruntime's CPU
    provider cannot run, is refused by check_onnx by name."""
    model = zoo.create_model(CONFIGS / "tiny_nat.yaml", num_classes=10, dtype=torch.float16).eval()
    diff, out = check_onnx(model, export_onnx(model, tmp_path / "half.onnx", SIZE))
    assert out.dtype == torch.float16 and diff < 1e-2
    with pytest.raises(ValueError, match="no bfloat16 kernels"):
        check_onnx(model.to(torch.bfloat16), tmp_path / "half.onnx")


def test_export_features_at_fixed_batch(tmp_path):
    """A features_only backbone exports all its levels as named outputs; an int batch_size fixes
    the batch axis, and check_onnx builds its own input from the file's shape."""
    import onnxruntime as ort
    torch.manual_seed(0)
    model = zoo.create_model(CONFIGS / "tiny_biformer.yaml", features_only=True, out_indices=(1, 3))
    path = export_onnx(model, tmp_path / "m.onnx", (3, 65, 97), batch_size=1)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [[1, 3, 65, 97]]
    assert [o.name for o in session.get_outputs()] == ["output0", "output1"]
    diff, out = check_onnx(model, path)
    assert [o.shape[0] for o in out] == [1, 1] and diff < 1e-4
    # a module that returns a dict (the detection trunk): its values are the outputs, in order
    from zoo.detection import ZooFeatures
    trunk = ZooFeatures(CONFIGS / "tiny_nat.yaml", out_indices=(2, 3)).eval()
    diff, out = check_onnx(trunk, export_onnx(trunk, tmp_path / "trunk.onnx", (64, 96), batch_size=1))
    assert list(out) == ["0", "1"] and diff < 1e-4


def test_torchscript_is_refused_with_the_way_on():
    """torch.jit.script would fail deep in a block with TorchScript's type error; the model says
    what to use instead, also inside a features_only wrapper."""
    pattern = r"TorchScript \(torch.jit.script\) is not supported: .* Use torch.compile, torch.export"
    for model in (timm.create_model("zoo_swin_tiny"), timm.create_model("zoo_nat_mini", features_only=True)):
        with warnings.catch_warnings(), pytest.raises(RuntimeError, match=pattern):
            warnings.simplefilter("ignore", FutureWarning)  # PyTorch's own: torch.jit.script is deprecated
            torch.jit.script(model)
