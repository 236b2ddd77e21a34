"""ROICtrlInstances: validation messages and the compaction to valid instances."""

import pytest
import torch

from roi_ops.roictrl_adapter import ROICtrlInstances


def _data(B=2, N=3, L=4, D=8):
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6]]).repeat(B, N, 1)
    return {"boxes": boxes, "embeddings": torch.randn(B, N, L, D)}


def test_compaction_keeps_valid_instances_in_order():
    data = _data()
    data["boxes"][0, 2] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    data["boxes"][1, 1] = torch.tensor([0.3, 0.3, 0.4, 0.9])
    data["masks"] = torch.tensor([[1, 0, 1], [0, 1, 0]])
    inst = ROICtrlInstances.coerce(data)
    assert inst.num_instances == 3
    assert inst.batch_index.tolist() == [0, 0, 1]
    assert inst.slot_index.tolist() == [0, 1, 0]
    assert inst.sample_index.tolist() == [0, 1]
    assert inst.max_instances_per_sample == 2
    torch.testing.assert_close(inst.instance_boxes[1], torch.tensor([0.0, 0.0, 1.0, 1.0]), rtol=0, atol=0)
    assert torch.equal(inst.instance_embeddings[2], data["embeddings"][1, 1])


def test_sample_without_instances_is_left_out():
    data = _data()
    data["masks"] = torch.tensor([[False, False, False], [True, True, False]])
    inst = ROICtrlInstances(**data)
    assert inst.sample_index.tolist() == [1]
    assert inst.batch_index.tolist() == [1, 1]
    assert inst.slot_index.tolist() == [0, 1]


def test_no_mask_means_all_valid_and_all_masked_means_none():
    assert ROICtrlInstances(**_data()).num_instances == 6
    data = _data()
    data["masks"] = torch.zeros(2, 3)
    inst = ROICtrlInstances(**data)
    assert inst.num_instances == 0 and inst.sample_index.numel() == 0 and inst.max_instances_per_sample == 0


def test_rois_are_in_pixel_units_of_a_non_square_map():
    data = _data(B=1, N=1)
    inst = ROICtrlInstances(**data)
    # x scales with the width (12), y with the height (8)
    expected = torch.tensor([[0.0, 0.1 * 12, 0.2 * 8, 0.5 * 12, 0.6 * 8]])
    torch.testing.assert_close(inst.rois(8, 12), expected)


def test_padded_slots_are_not_checked():
    data = _data()
    data["boxes"][0, 1] = torch.tensor([float("nan"), 5.0, -3.0, 0.0])
    data["masks"] = torch.tensor([[1, 0, 1], [1, 1, 1]])
    assert ROICtrlInstances(**data).num_instances == 5


@pytest.mark.parametrize(
    "box",
    [[0.5, 0.1, 0.4, 0.6], [0.1, 0.7, 0.5, 0.6], [-0.1, 0.1, 0.5, 0.6], [0.1, 0.1, 1.2, 0.6], [float("nan"), 0, 1, 1],
     [0, 0, float("inf"), 1]],
)
def test_bad_box_values_raise(box):
    data = _data()
    data["boxes"][1, 2] = torch.tensor(box)
    with pytest.raises(ValueError, match=r"0 <= x1 <= x2 <= 1.*sample 1, slot 2"):
        ROICtrlInstances(**data)


@pytest.mark.parametrize(
    "key, value, exc, match",
    [
        ("boxes", torch.zeros(2, 3, 5), ValueError, r"boxes must be Tensor\[B, N, 4\].*got torch.float32 Tensor\[2, 3, 5\]"),
        ("boxes", torch.zeros(2, 3, 4, dtype=torch.long), TypeError, r"boxes must be a floating-point tensor, got torch.int64"),
        ("boxes", [[0, 0, 1, 1]], ValueError, r"boxes must be Tensor\[B, N, 4\].*got list"),
        ("embeddings", torch.zeros(2, 4, 4, 8), ValueError, r"embeddings must be Tensor\[B, N, L, D\] with B=2, N=3"),
        ("embeddings", torch.zeros(2, 3, 8), ValueError, r"embeddings must be Tensor\[B, N, L, D\]"),
        ("embeddings", torch.zeros(2, 3, 4, 8, dtype=torch.int32), TypeError, r"embeddings must be a floating-point"),
        ("masks", torch.ones(3, 2), ValueError, r"masks must be Tensor\[B, N\] with B=2, N=3.*Tensor\[3, 2\]"),
        ("masks", torch.full((2, 3), 2), ValueError, r"masks must be bool or hold only 0 and 1"),
        ("scale", float("nan"), ValueError, r"scale must be a finite number"),
        ("scale", "strong", ValueError, r"scale must be a finite number, got 'strong'"),
        ("scale", torch.ones(2), ValueError, r"scale must be a number"),
    ],
)
def test_bad_arguments_raise(key, value, exc, match):
    data = _data()
    data[key] = value
    with pytest.raises(exc, match=match):
        ROICtrlInstances.coerce(data)


def test_dict_keys_are_checked():
    data = _data()
    with pytest.raises(ValueError, match=r"unknown keys \['mask'\]"):
        ROICtrlInstances.coerce({**data, "mask": torch.ones(2, 3)})
    with pytest.raises(ValueError, match=r"needs keys \['embeddings'\]"):
        ROICtrlInstances.coerce({"boxes": data["boxes"]})
    with pytest.raises(TypeError, match=r"must be a ROICtrlInstances or a dict.*got tuple"):
        ROICtrlInstances.coerce((data["boxes"], data["embeddings"]))


def test_coerce_returns_the_same_object():
    inst = ROICtrlInstances(**_data())
    assert ROICtrlInstances.coerce(inst) is inst
    assert ROICtrlInstances(**_data(), scale=torch.tensor(0.5)).scale == 0.5
