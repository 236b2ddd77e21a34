"""The training-free regional baseline (benchmarks/instance_control/regional.py) does what it says."""

import pytest
import torch

from instance_control import regional


def test_box_masks_take_the_pixels_whose_centres_lie_in_the_box():
    m = regional.box_masks(torch.tensor([[0.0, 0.0, 0.5, 0.25], [0.3, 0.3, 0.3, 0.3]]), 4, 4).view(2, 4, 4)
    assert m[0].nonzero().tolist() == [[0, 0], [0, 1]]
    assert not m[1].any()
    with pytest.raises(ValueError, match=r"boxes must be \[N, 4\]"):
        regional.box_masks(torch.zeros(4), 4, 4)


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=8).eval()


def test_regions_steer_only_the_conditional_half_and_the_unet_is_restored():
    unet = _tiny_unet()
    before = dict(unet.attn_processors)
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    t = torch.tensor([10, 10])
    with torch.no_grad():
        plain = unet(x, t, text).sample
        regions = regional.RegionalPrompts()
        # A region whose caption is the global one changes nothing: the regional output is the same attention.
        with regions.active(unet, text[1:], torch.tensor([[0.0, 0.0, 0.5, 0.5]]), cfg=True):
            same = unet(x, t, text).sample
        with regions.active(unet, torch.randn(1, 5, 8, generator=g), torch.tensor([[0.0, 0.0, 0.5, 0.5]]), cfg=True):
            other = unet(x, t, text).sample
    assert torch.allclose(same, plain, atol=1e-5)
    assert torch.equal(other[0], plain[0])  # the unconditional half keeps the global (empty) prompt
    assert not torch.allclose(other[1], plain[1], atol=1e-3)
    assert dict(unet.attn_processors).keys() == before.keys()
    assert all(type(p) is type(before[k]) for k, p in unet.attn_processors.items())
