"""Bad inputs raise a clear exception of the right type whose message names the
argument; the raw custom ops refuse bad box values themselves (they are
callable directly and must never read or write out of bounds).

Conventions (roi_ops/_validation.py, csrc/common/host_checks.h): TypeError for
a wrong Python type or dtype, ValueError for a wrong shape or value,
RuntimeError for tensors on different devices.
"""
from __future__ import annotations

import pytest
import torch

import roi_ops

B, C, H, W = 2, 3, 6, 5
NAN, INF = float("nan"), float("inf")


def _x():
    return torch.randn(B, C, H, W)


def _boxes():
    return torch.tensor([[0, 0.5, 0.5, 3.0, 4.0], [1, 1.0, 0.0, 4.0, 5.5]])


def _grids(k=2):
    return torch.randn(k, C, 3, 2)


_DEFAULT = object()


def align(x=_DEFAULT, boxes=_DEFAULT, output_size=(3, 2), **kw):
    return lambda: roi_ops.roi_align(_x() if x is _DEFAULT else x,
                                     _boxes() if boxes is _DEFAULT else boxes, output_size, **kw)


def unpool(x=_DEFAULT, boxes=_DEFAULT, output_size=(H, W), **kw):
    return lambda: roi_ops.roi_unpool(_grids() if x is _DEFAULT else x,
                                      _boxes() if boxes is _DEFAULT else boxes, output_size, **kw)


def _with(value, row=0, col=0):
    b = _boxes()
    b[row, col] = value
    return b


BOX_ERR = r"boxes|rois"  # value errors come from the C++ op, whose argument is rois

CASES = [
    # ---- input
    ("align input not a tensor", align(x=[[1.0]]), TypeError, "input"),
    ("align input int64", align(x=torch.ones(B, C, H, W, dtype=torch.int64)), TypeError, "input"),
    ("align input uint8", align(x=torch.ones(B, C, H, W, dtype=torch.uint8)), TypeError, "input"),
    ("align input bool", align(x=torch.ones(B, C, H, W, dtype=torch.bool)), TypeError, "input"),
    ("align input complex", align(x=torch.ones(B, C, H, W, dtype=torch.complex64)), TypeError, "input"),
    ("align input 3-D", align(x=torch.randn(C, H, W)), ValueError, "input"),
    ("align input 5-D", align(x=torch.randn(1, B, C, H, W)), ValueError, "input"),
    ("unpool input not a tensor", unpool(x=3.0), TypeError, "input"),
    ("unpool input int32", unpool(x=torch.ones(2, C, 3, 2, dtype=torch.int32)), TypeError, "input"),
    ("unpool input bool", unpool(x=torch.ones(2, C, 3, 2, dtype=torch.bool)), TypeError, "input"),
    ("unpool input 3-D", unpool(x=torch.randn(2, 3, 2)), ValueError, "input"),
    ("unpool input.shape[0] != K", unpool(x=_grids(3)), ValueError, "input"),
    ("unpool input.shape[0] != K (list)", unpool(x=_grids(1), boxes=[torch.rand(1, 4), torch.rand(1, 4)]),
     ValueError, "input"),
    # ---- boxes: type, shape, format
    ("align boxes int", align(boxes=_boxes().long()), TypeError, "boxes"),
    ("align boxes bool", align(boxes=_boxes() > 1), TypeError, "boxes"),
    ("align boxes string", align(boxes="boxes"), TypeError, "boxes"),
    ("align boxes None", align(boxes=None), TypeError, "boxes"),
    ("align boxes dict", align(boxes={0: torch.rand(1, 4)}), TypeError, "boxes"),
    ("align input None", align(x=None), TypeError, "input"),
    ("align boxes [K, 4]", align(boxes=torch.rand(2, 4)), ValueError, "boxes"),
    ("align boxes [K, 6]", align(boxes=torch.rand(2, 6)), ValueError, "boxes"),
    ("align boxes 1-D", align(boxes=torch.rand(5)), ValueError, "boxes"),
    ("align boxes 3-D", align(boxes=torch.rand(2, 5, 1)), ValueError, "boxes"),
    ("align list entry [K, 5]", align(boxes=[torch.rand(1, 5), torch.rand(1, 5)]), ValueError, "boxes"),
    ("align list entry 1-D", align(boxes=[torch.rand(4), torch.rand(1, 4)]), ValueError, "boxes"),
    ("align list entry not a tensor", align(boxes=[[0.0, 0.0, 1.0, 1.0], torch.rand(1, 4)]), TypeError, "boxes"),
    ("align list entry int", align(boxes=[torch.ones(1, 4, dtype=torch.int64), torch.rand(1, 4)]),
     TypeError, "boxes"),
    ("align list shorter than B", align(boxes=[torch.rand(2, 4)]), ValueError, "boxes"),
    ("align list longer than B", align(boxes=[torch.rand(2, 4)] * 3), ValueError, "boxes"),
    ("align empty list for B=2", align(boxes=[]), ValueError, "boxes"),
    ("unpool boxes int", unpool(boxes=_boxes().int()), TypeError, "boxes"),
    ("unpool boxes [K, 4]", unpool(boxes=torch.rand(2, 4)), ValueError, "boxes"),
    ("unpool list entry [K, 5]", unpool(boxes=[torch.rand(2, 5)]), ValueError, "boxes"),
    # ---- boxes: values (checked by the C++ op)
    ("align batch index -1", align(boxes=_with(-1.0)), ValueError, BOX_ERR),
    ("align batch index == B", align(boxes=_with(float(B))), ValueError, BOX_ERR),
    ("align batch index 0.5", align(boxes=_with(0.5)), ValueError, BOX_ERR),
    ("align batch index -0.5", align(boxes=_with(-0.5)), ValueError, BOX_ERR),
    ("align batch index 1e30", align(boxes=_with(1e30)), ValueError, BOX_ERR),
    ("align batch index nan", align(boxes=_with(NAN)), ValueError, BOX_ERR),
    ("align batch index inf", align(boxes=_with(INF)), ValueError, BOX_ERR),
    ("unpool batch index -1", unpool(boxes=_with(-1.0, row=1)), ValueError, BOX_ERR),
    ("unpool batch index 0.5", unpool(boxes=_with(0.5, row=1)), ValueError, BOX_ERR),
    ("unpool batch index nan", unpool(boxes=_with(NAN)), ValueError, BOX_ERR),
] + [
    (f"{name} {what} in column {col}", fn(boxes=_with(value, row=1, col=col)), ValueError, BOX_ERR)
    for name, fn in (("align", align), ("unpool", unpool))
    for col in (1, 2, 3, 4)
    for what, value in (("nan", NAN), ("inf", INF), ("-inf", -INF))
] + [
    ("align nan in list form", align(boxes=[torch.rand(1, 4), torch.tensor([[0.0, NAN, 1.0, 1.0]])]),
     ValueError, BOX_ERR),
    ("unpool inf in list form", unpool(boxes=[torch.tensor([[0.0, 0.0, INF, 1.0]]), torch.rand(1, 4)]),
     ValueError, BOX_ERR),
    # ---- output_size
    ("align output_size 0", align(output_size=0), ValueError, "output_size"),
    ("align output_size -2", align(output_size=-2), ValueError, "output_size"),
    ("align output_size (2, 0)", align(output_size=(2, 0)), ValueError, "output_size"),
    ("align output_size (-1, 3)", align(output_size=(-1, 3)), ValueError, "output_size"),
    ("align output_size 2.5", align(output_size=2.5), TypeError, "output_size"),
    ("align output_size (2.0, 2)", align(output_size=(2.0, 2)), TypeError, "output_size"),
    ("align output_size '7'", align(output_size="7"), TypeError, "output_size"),
    ("align output_size None", align(output_size=None), TypeError, "output_size"),
    ("align output_size True", align(output_size=True), TypeError, "output_size"),
    ("align output_size (1, 2, 3)", align(output_size=(1, 2, 3)), TypeError, "output_size"),
    ("unpool output_size 0", unpool(output_size=0), ValueError, "output_size"),
    ("unpool output_size (6, -5)", unpool(output_size=(6, -5)), ValueError, "output_size"),
    ("unpool output_size 6.0", unpool(output_size=6.0), TypeError, "output_size"),
    ("unpool output_size (6,)", unpool(output_size=(6,)), TypeError, "output_size"),
    # ---- scalars
    ("align sampling_ratio 1.5", align(sampling_ratio=1.5), TypeError, "sampling_ratio"),
    ("align sampling_ratio '2'", align(sampling_ratio="2"), TypeError, "sampling_ratio"),
    ("align sampling_ratio None", align(sampling_ratio=None), TypeError, "sampling_ratio"),
    ("align sampling_ratio True", align(sampling_ratio=True), TypeError, "sampling_ratio"),
    ("align spatial_scale '1'", align(spatial_scale="1"), TypeError, "spatial_scale"),
    ("align spatial_scale 0", align(spatial_scale=0.0), ValueError, "spatial_scale"),
    ("align spatial_scale -1", align(spatial_scale=-1.0), ValueError, "spatial_scale"),
    ("align spatial_scale nan", align(spatial_scale=NAN), ValueError, "spatial_scale"),
    ("align spatial_scale inf", align(spatial_scale=INF), ValueError, "spatial_scale"),
    ("unpool spatial_scale nan", unpool(spatial_scale=NAN), ValueError, "spatial_scale"),
    ("unpool spatial_scale None", unpool(spatial_scale=None), TypeError, "spatial_scale"),
    ("align aligned 'yes'", align(aligned="yes"), TypeError, "aligned"),
    ("unpool aligned None", unpool(aligned=None), TypeError, "aligned"),
    # ---- devices ("meta" stands in for a second device)
    ("align boxes on another device", align(boxes=_boxes().to("meta")), RuntimeError, "device"),
    ("align input on another device", align(x=_x().to("meta")), RuntimeError, "device"),
    ("align list entry on another device", align(boxes=[torch.rand(1, 4), torch.rand(1, 4, device="meta")]),
     RuntimeError, "device"),
    ("unpool boxes on another device", unpool(boxes=_boxes().to("meta")), RuntimeError, "device"),
    ("unpool input on another device", unpool(x=_grids().to("meta")), RuntimeError, "device"),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(call, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        call()
    # the message says what was expected: more than the bare argument name
    assert len(str(info.value)) > 25, str(info.value)


@pytest.mark.parametrize("value", [-1.0, 2.0, 0.5, 1e30])
def test_batch_index_message_says_batch_index(value):
    with pytest.raises(ValueError, match=r"(?i)batch") as info:
        align(boxes=_with(value))()
    assert f"{B}" in str(info.value), "the message should give the valid range"


@pytest.mark.parametrize("col", [0, 2])
@pytest.mark.parametrize("value", [NAN, INF])
def test_non_finite_message_says_finite(value, col):
    with pytest.raises(ValueError, match=r"(?i)finite|nan|inf"):
        align(boxes=_with(value, col=col))()


def test_valid_edge_values_are_accepted():
    # -0.0 is batch index 0; float16 and float64 boxes are fine for float32 features
    x = _x()
    boxes = _with(-0.0)
    assert roi_ops.roi_align(x, boxes, 2).shape == (2, C, 2, 2)
    assert roi_ops.roi_align(x, boxes.half(), 2).shape == (2, C, 2, 2)
    assert roi_ops.roi_align(x, boxes.double(), 2).shape == (2, C, 2, 2)
    assert roi_ops.roi_unpool(_grids(), list(boxes[:, 1:].split(1)), (H, W)).shape == (2, C, H, W)


# ---------------------------------------------------------------- raw custom ops


def _rois(value=None, row=0, col=0):
    r = _boxes()
    if value is not None:
        r[row, col] = value
    return r


ops = torch.ops.roi_ops

RAW_CASES = [
    ("roi_align batch index == B", lambda: ops.roi_align(_x(), _rois(float(B)), 1.0, 2, 2, -1, False),
     ValueError, "rois"),
    ("roi_align batch index 7", lambda: ops.roi_align(_x(), _rois(7.0, row=1), 1.0, 2, 2, 2, True),
     ValueError, "rois"),
    ("roi_align batch index -1", lambda: ops.roi_align(_x(), _rois(-1.0), 1.0, 2, 2, -1, False),
     ValueError, "rois"),
    ("roi_align batch index 0.5", lambda: ops.roi_align(_x(), _rois(0.5), 1.0, 2, 2, -1, False),
     ValueError, "rois"),
    ("roi_align batch index 1e30", lambda: ops.roi_align(_x(), _rois(1e30), 1.0, 2, 2, -1, False),
     ValueError, "rois"),
    ("roi_align nan coordinate", lambda: ops.roi_align(_x(), _rois(NAN, col=3), 1.0, 2, 2, -1, False),
     ValueError, "rois"),
    ("roi_align rois [K, 4]", lambda: ops.roi_align(_x(), torch.rand(2, 4), 1.0, 2, 2, -1, False),
     ValueError, "rois"),
    ("roi_align input 3-D", lambda: ops.roi_align(torch.rand(C, H, W), _rois(), 1.0, 2, 2, -1, False),
     ValueError, "input"),
    ("roi_align pooled_height 0", lambda: ops.roi_align(_x(), _rois(), 1.0, 0, 2, -1, False),
     ValueError, "pooled_height"),
    ("roi_align pooled_width -3", lambda: ops.roi_align(_x(), _rois(), 1.0, 2, -3, -1, False),
     ValueError, "pooled_width"),
    ("roi_align int input", lambda: ops.roi_align(_x().long(), _rois(), 1.0, 2, 2, -1, False),
     TypeError, "input"),
    ("roi_align int rois", lambda: ops.roi_align(_x(), _rois().long(), 1.0, 2, 2, -1, False),
     TypeError, "rois"),
    ("_roi_align_backward batch index >= batch_size",
     lambda: ops._roi_align_backward(torch.randn(2, C, 2, 2), _rois(1.0), 1.0, 2, 2, 1, C, H, W, -1, False),
     ValueError, "rois"),
    ("_roi_align_backward batch index -1",
     lambda: ops._roi_align_backward(torch.randn(2, C, 2, 2), _rois(-1.0), 1.0, 2, 2, B, C, H, W, -1, False),
     ValueError, "rois"),
    ("_roi_align_backward batch index 0.5",
     lambda: ops._roi_align_backward(torch.randn(2, C, 2, 2), _rois(0.5), 1.0, 2, 2, B, C, H, W, 2, True),
     ValueError, "rois"),
    ("_roi_align_backward inf coordinate",
     lambda: ops._roi_align_backward(torch.randn(2, C, 2, 2), _rois(INF, col=1), 1.0, 2, 2, B, C, H, W, 2, True),
     ValueError, "rois"),
    ("_roi_align_backward grad K mismatch",
     lambda: ops._roi_align_backward(torch.randn(3, C, 2, 2), _rois(), 1.0, 2, 2, B, C, H, W, -1, False),
     ValueError, "grad"),
    ("_roi_align_backward grad C mismatch",
     lambda: ops._roi_align_backward(torch.randn(2, C, 2, 2), _rois(), 1.0, 2, 2, B, C + 4, H, W, -1, False),
     ValueError, "grad|channels"),
    ("_roi_align_backward grad PH mismatch",
     lambda: ops._roi_align_backward(torch.randn(2, C, 2, 2), _rois(), 1.0, 5, 2, B, C, H, W, -1, False),
     ValueError, "grad|pooled"),
    ("_roi_align_backward negative height",
     lambda: ops._roi_align_backward(torch.randn(2, C, 2, 2), _rois(), 1.0, 2, 2, B, C, -H, W, -1, False),
     ValueError, "height"),
    ("roi_unpool batch index -1", lambda: ops.roi_unpool(_grids(), _rois(-1.0), 1.0, H, W, False),
     ValueError, "rois"),
    ("roi_unpool batch index 0.5", lambda: ops.roi_unpool(_grids(), _rois(0.5), 1.0, H, W, False),
     ValueError, "rois"),
    ("roi_unpool nan coordinate", lambda: ops.roi_unpool(_grids(), _rois(NAN, row=1, col=4), 1.0, H, W, True),
     ValueError, "rois"),
    ("roi_unpool K mismatch", lambda: ops.roi_unpool(_grids(3), _rois(), 1.0, H, W, False),
     ValueError, "input|rois"),
    ("roi_unpool height 0", lambda: ops.roi_unpool(_grids(), _rois(), 1.0, 0, W, False),
     ValueError, "height"),
    ("roi_unpool rois [K, 4]", lambda: ops.roi_unpool(_grids(), torch.rand(2, 4), 1.0, H, W, False),
     ValueError, "rois"),
    ("_roi_unpool_backward K mismatch",
     lambda: ops._roi_unpool_backward(torch.randn(3, C, H, W), _rois(), 1.0, 3, 2, False),
     ValueError, "grad"),
    # (0 is an empty grid, which the forward accepts: zero gradients, see test_hardening.py)
    ("_roi_unpool_backward pooled_height -1",
     lambda: ops._roi_unpool_backward(torch.randn(2, C, H, W), _rois(), 1.0, -1, 2, False),
     ValueError, "pooled_height"),
    ("_roi_unpool_backward nan coordinate",
     lambda: ops._roi_unpool_backward(torch.randn(2, C, H, W), _rois(NAN, col=2), 1.0, 3, 2, False),
     ValueError, "rois"),
    ("_roi_unpool_backward batch index -2",
     lambda: ops._roi_unpool_backward(torch.randn(2, C, H, W), _rois(-2.0), 1.0, 3, 2, False),
     ValueError, "rois"),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES])
def test_raw_op_refuses_bad_input(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()
