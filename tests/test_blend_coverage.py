"""roi_unpool_blend's soft coverage (docs/spec.md, "Soft coverage"): the CPU kernel against the reference forward
and backward, gradcheck (the coverage's gradient too), the exact properties (all ones == no coverage, zeros ==
the box absent, nothing taking part == base), the footprint crops, the bad-input contract and opcheck. The CUDA
kernels' emulation is tested in tools/test_cuda_emulate.py."""
from __future__ import annotations

import pytest
import torch

import roi_ops
from roi_ops import reference

B, C, H, W, P = 2, 3, 9, 11, 3
ROIS = [(0, 1.2, 0.5, 7.3, 6.1), (0, 3.0, 2.0, 10.0, 9.0), (1, 0.0, 0.0, 11.0, 9.0), (1, 5.5, 4.2, 8.1, 8.8),
        (0, 20.0, 20.0, 30.0, 30.0)]  # the last one covers nothing


def operands(dtype=torch.float64, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rois = torch.tensor(ROIS, dtype=dtype)
    K = rois.shape[0]
    base = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    if channels_last:
        base = base.contiguous(memory_format=torch.channels_last)
    bl = torch.randn(B, H, W, generator=g, dtype=dtype) * 2
    inp = torch.randn(K, C, P, P, generator=g, dtype=dtype)
    il = torch.randn(K, P, P, generator=g, dtype=dtype) * 2
    dense = torch.rand(K, H, W, generator=g, dtype=torch.float64)
    dense[dense < 0.2] = 0
    dense[dense > 0.9] = 1
    cov = roi_ops.footprint_crops(dense.to(dtype), rois, 1.0, True)
    return [t.requires_grad_() for t in (base, bl, inp, il)], rois, cov.requires_grad_()


def blend(ops, rois, cov=None, fn=roi_ops.roi_unpool_blend):
    return fn(*ops, rois, 1.0, True, coverage=cov)


def grads(outs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    return torch.autograd.grad(outs, inputs, cot)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_matches_reference(dtype, channels_last):
    ops, rois, cov = operands(dtype, channels_last)
    got, want = blend(ops, rois, cov), blend(ops, rois, cov, fn=reference.roi_unpool_blend)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    for a, b in zip(grads(got, [*ops, cov]), grads(want, [*ops, cov])):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol)


def test_gradcheck_with_coverage():
    ops, rois, _ = operands()
    keep = [0, 1, 3]
    ops = [ops[0].detach()[:1].requires_grad_(), ops[1].detach()[:1].requires_grad_(),
           ops[2].detach()[keep].requires_grad_(), ops[3].detach()[keep].requires_grad_()]
    rois = rois[keep].clone()
    rois[:, 0] = 0
    cov = (torch.rand(len(keep), 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.9
           + 0.05).requires_grad_()  # strictly inside (0, 1): finite differences stay in the domain
    assert torch.autograd.gradcheck(lambda *t: roi_ops.roi_unpool_blend(*t[:4], rois, 1.0, True, coverage=t[4]),
                                    (*ops, cov))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_ones_is_bitwise_no_coverage_and_zeros_is_absent(dtype, channels_last):
    ops, rois, cov = operands(dtype, channels_last)
    plain = blend(ops, rois)
    ones = blend(ops, rois, torch.ones_like(cov))
    assert all(torch.equal(a, b) for a, b in zip(plain, ones))
    assert all(torch.equal(a, b) for a, b in zip(grads(plain, ops), grads(ones, ops)))
    # box 1 with coverage 0 everywhere: bitwise the call without it
    zero = cov.detach().clone()
    zero[1] = 0
    keep = [0, 2, 3, 4]
    without = roi_ops.roi_unpool_blend(*(t[keep] if i >= 2 else t for i, t in enumerate(ops)), rois[keep], 1.0,
                                       True, coverage=zero[keep])
    assert all(torch.equal(a, b) for a, b in zip(blend(ops, rois, zero), without))


def test_nothing_taking_part_is_base_and_coverage_gradient_is_exact():
    ops, rois, cov = operands()
    zero = torch.zeros_like(cov).requires_grad_()
    out, bw = blend(ops, rois, zero)
    assert torch.equal(out, ops[0]) and bool((bw == 1).all())
    # d out / d c_k at c_k = 0: exp(l_k - base_logit) (v_k - base), what the reference's autograd gives too
    (g_kernel,) = torch.autograd.grad(out.sum() + bw.sum(), zero)
    ref = reference.roi_unpool_blend(*ops, rois, 1.0, True, coverage=zero)
    (g_ref,) = torch.autograd.grad(ref[0].sum() + ref[1].sum(), zero)
    torch.testing.assert_close(g_kernel, g_ref, atol=1e-11, rtol=1e-11)
    assert bool((g_kernel != 0).any())


def test_footprint_crops_round_trip():
    rois = torch.tensor(ROIS, dtype=torch.float64)
    dense = torch.rand(len(ROIS), H, W, dtype=torch.float64)
    crops = roi_ops.footprint_crops(dense, rois, 1.0, True)
    y0, y1, x0, x1 = reference.roi_unpool_footprint(rois, (H, W), 1.0, True, torch.float64)
    assert crops.shape == (len(ROIS), int((y1 - y0).max()), int((x1 - x0).max()))
    back = reference.coverage_from_crops(crops, rois, (H, W), 1.0, True, torch.float64)
    covered = reference.roi_unpool_coverage(rois, (H, W), 1.0, True, torch.float64)
    assert torch.equal(back, torch.where(covered, dense, torch.zeros(())))


def test_bad_coverage_is_refused_naming_it():
    ops, rois, cov = operands(torch.float32)
    with pytest.raises(ValueError, match=r"coverage must be Tensor\[K, FH, FW\] with FH >= 9 and FW >= 11"):
        blend(ops, rois, cov[:, :4, :4])
    with pytest.raises(ValueError, match="coverage must be Tensor"):
        blend(ops, rois, cov[:2])
    with pytest.raises(TypeError, match="coverage must have base's dtype"):
        blend(ops, rois, cov.double())
    with pytest.raises(TypeError, match="coverage must be a Tensor"):
        blend(ops, rois, [[1.0]])
    # the op itself (what a caller of torch.ops gets)
    with pytest.raises(ValueError, match="FH >= 9"):
        torch.ops.roi_ops.roi_unpool_blend(*[t.detach() for t in ops], rois, 1.0, True, cov.detach()[:, :4])


def test_opcheck_with_coverage():
    ops, rois, cov = operands(torch.float32)
    keep = [0, 1]  # two boxes (of image 0) keep it quick
    args = (ops[0].detach()[:1], ops[1].detach()[:1], ops[2].detach()[keep], ops[3].detach()[keep],
            rois[keep], 1.0, True, cov.detach()[keep])
    torch.library.opcheck(torch.ops.roi_ops.roi_unpool_blend.default, args)
    grad = torch.randn(1, C, H, W)
    torch.library.opcheck(torch.ops.roi_ops._roi_unpool_blend_backward.default,
                          (grad, torch.randn(1, H, W)) + args)
