"""Checks run INSIDE a fresh virtual environment that has roi-ops installed
from its sdist or its wheel with the [adapter,demo,test] extras.

tests/test_packaging.py copies this file out of the checkout and runs it with
that environment's pytest (so the [test] extra is exercised too); it is not
collected by the repository's own test run (its name is not test_*.py). It
uses nothing but the installed package and its extras: the ops are checked
against the package's own reference, ``roi_ops.reference``.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys

import pytest
import torch

import roi_ops
from roi_ops import reference

# A fallback to the pure-PyTorch path warns; here that is a failure.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

ROIS = [[0, 1.3, 2.1, 9.7, 10.2], [1, 0.2, 0.4, 6.5, 5.0], [0, 3.0, 3.0, 3.5, 3.5], [1, -2.0, 4.0, 14.5, 16.0]]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def test_installed_not_the_checkout():
    assert sys.prefix != sys.base_prefix, "not running in a virtual environment"
    for module in (roi_ops, torch):
        assert module.__file__.startswith(sys.prefix), f"{module.__name__} from {module.__file__}, not {sys.prefix}"
    assert roi_ops.native_available("cpu"), roi_ops.native_import_error()
    assert roi_ops.__version__ == md.version("roi-ops")


def test_build_info_and_pin_match_this_torch():
    from roi_ops import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__
    requires = md.requires("roi-ops")
    release = torch.__version__.split("+")[0]
    assert f"torch=={release}" in requires, requires
    assert md.files("roi-ops") is not None
    installed = {str(f) for f in md.files("roi-ops")}
    assert "roi_ops/py.typed" in installed and "roi_ops/_build_info.py" in installed, sorted(installed)


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 13, 11, generator=g, dtype=dtype)
    rois = torch.tensor(ROIS, dtype=dtype)
    return x, rois, g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_forward_backward_match_reference(dtype, aligned):
    x, rois, g = _inputs(dtype)
    x_native, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = roi_ops.roi_align(x_native, rois, (4, 5), spatial_scale=0.9, sampling_ratio=2, aligned=aligned)
    ref = reference.roi_align(x_ref, rois, (4, 5), 0.9, 2, aligned)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    grad = torch.randn(out.shape, generator=g, dtype=dtype)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x_native.grad, x_ref.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_unpool_forward_backward_match_reference(dtype, aligned):
    _, rois, g = _inputs(dtype)
    grids = torch.randn(len(ROIS), 3, 4, 5, generator=g, dtype=dtype)
    native, ref_in = grids.clone().requires_grad_(), grids.clone().requires_grad_()
    out = roi_ops.roi_unpool(native, rois, (13, 11), spatial_scale=0.9, aligned=aligned)
    ref = reference.roi_unpool(ref_in, rois, (13, 11), 0.9, aligned)
    assert out.abs().sum() > 0
    torch.testing.assert_close(out, ref, **TOL[dtype])
    grad = torch.randn(out.shape, generator=g, dtype=dtype)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(native.grad, ref_in.grad, **TOL[dtype])


def test_gradcheck_both_ops():
    x, rois, g = _inputs(torch.float64)
    x = x[:, :2].clone().requires_grad_()
    grids = torch.randn(len(ROIS), 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: roi_ops.roi_align(t, rois, (3, 3), 1.0, 2, True), (x,))
    assert torch.autograd.gradcheck(lambda t: roi_ops.roi_unpool(t, rois, (13, 11), 1.0, True), (grids,))


# --- the [test] extra: hypothesis, numpy, pytest-benchmark, expecttest ------------------------

def test_property_with_hypothesis_and_numpy():
    import expecttest  # noqa: F401  (part of the extra; the repository's compile tests use it)
    import numpy as np
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=10, deadline=None, derandomize=True)
    @given(st.lists(st.floats(-3.0, 15.0), min_size=4, max_size=4), st.integers(1, 4))
    def check(coords, ratio):
        x1, x2 = sorted(coords[:2])
        y1, y2 = sorted(coords[2:])
        rois = torch.from_numpy(np.array([[1, x1, y1, x2, y2]], dtype=np.float64))
        x, _, _ = _inputs(torch.float64, seed=1)
        out = roi_ops.roi_align(x, rois, (3, 4), 1.0, ratio, True)
        torch.testing.assert_close(out, reference.roi_align(x, rois, (3, 4), 1.0, ratio, True), **TOL[torch.float64])

    check()


def test_benchmark_plugin(benchmark):
    x, rois, _ = _inputs(torch.float32)
    out = benchmark.pedantic(roi_ops.roi_align, args=(x, rois, (4, 4), 1.0, 2, True), rounds=2, iterations=1)
    assert out.shape == (len(ROIS), 3, 4, 4)


# --- the [adapter] extra: diffusers, transformers, safetensors ---------------------------------

def test_adapter_on_a_tiny_unet(tmp_path):
    import safetensors.torch
    import transformers  # noqa: F401  (the extra's text-encoder side)
    from diffusers import UNet2DConditionModel

    from roi_ops.roictrl_adapter import ROICtrlAdapter

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    ).requires_grad_(False).eval()
    sample, t, text = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 7, 32)
    roictrl = {"boxes": torch.tensor([[[0.1, 0.2, 0.6, 0.9]]]), "embeddings": torch.randn(1, 1, 5, 32)}
    with torch.no_grad():
        base = unet(sample, t, text).sample
    adapter = ROICtrlAdapter.from_unet(unet, grid_sizes={8: 6, 16: 4}).install(unet)
    out = unet(sample, t, text, cross_attention_kwargs={"roictrl": roictrl}).sample
    assert not torch.equal(out, base), "the installed adapter changed nothing"
    out.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    adapter.save_pretrained(tmp_path / "adapter")
    assert any(safetensors.torch.load_file(str(f)) for f in (tmp_path / "adapter").glob("*.safetensors"))
    adapter.uninstall(unet)
    with torch.no_grad():
        assert torch.equal(unet(sample, t, text).sample, base)


def test_console_script():
    """[project.scripts]: `roi-ops` is on the environment's PATH and lists its subcommands."""
    exe = os.path.join(sys.prefix, "bin", "roi-ops")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "generate" in out, out


# --- the [demo] extra: pillow, matplotlib ---------------------------------------------------

def test_demo_writes_its_picture(tmp_path):
    from PIL import Image

    target = tmp_path / "demo.png"
    env = dict(os.environ, MPLBACKEND="Agg")
    run = subprocess.run([sys.executable, "-m", "roi_ops.demo", "--out", str(target), "--repeats", "1"],
                         check=True, env=env, cwd=tmp_path, capture_output=True, text=True)
    with Image.open(target) as picture:
        assert picture.width > 100 and picture.height > 100
    # the package does not ship the toy model: the demo says how to get it ...
    assert "skipped the ROICtrl part, which needs --toy-model DIR" in run.stdout, run.stdout
    assert "benchmarks/instance_control/checkpoints" in run.stdout


def test_demo_with_the_toy_model(tmp_path):
    """... and, given --toy-model (the checkout's, named by the packaging test), the installed demo runs it."""
    from PIL import Image

    toy = os.environ.get("ROI_OPS_TOY_MODEL")
    assert toy, "ROI_OPS_TOY_MODEL is not set (tests/test_packaging.py sets it)"
    target = tmp_path / "toy.png"
    env = dict(os.environ, MPLBACKEND="Agg")
    subprocess.run([sys.executable, "-m", "roi_ops.demo", "--out", str(tmp_path / "ops.png"), "--repeats", "1",
                    "--toy-model", toy, "--toy-out", str(target), "--toy-seeds", "1"],
                   check=True, env=env, cwd=tmp_path)
    with Image.open(target) as picture:
        assert picture.width > 600
