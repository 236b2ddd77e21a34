"""The adapter against an independent oracle (roictrl_oracle.py: the equations of docs/adapter.md in plain tensor
code, roi_ops.reference for the crops and the paste-back), in float64, with random non-zero gates, projections
and blend weights: one block (fused and unfused blend), forward and the gradients of every adapter parameter, and
a whole UNet with the adapter installed against the same UNet whose cross-attention outputs are recomputed by
the oracle from forward hooks of this test. A knockout test shows that each step of the oracle moves the
result far beyond the tolerance, so a bug in any step of the block fails the comparison."""

import pytest
import torch
from diffusers.models.attention_processor import Attention
from roictrl_oracle import KNOCKOUTS, LayerInputs, box_tokens, oracle_layer
from roictrl_testutils import make_adapter, make_instances, make_unet, randomize_, unet_inputs

from roi_ops.roictrl_adapter import BoxEncoder, ROICtrlBlock, ROICtrlInstances
from roi_ops.roictrl_adapter.options import ArchitectureOptions

B, H, W, C, D, L, P, HEADS, POS, FREQS = 3, 6, 10, 16, 12, 5, 4, 2, 8, 4
# float64 throughout: the block and the oracle differ only in summation order (SDPA vs an explicit softmax,
# the kernels vs the reference), ~1e-15 relative; every knockout moves the output by more than 1e-2.
RTOL, ATOL = 1e-11, 1e-12

NAN = float("nan")
# In 64ths (exact in float32, see roictrl_oracle.box_tokens). Sample 0: two overlapping boxes with a padded slot
# (garbage) between them; sample 1: no instance; sample 2: the whole map, a box a third of a pixel wide on this
# map, and a box in the top right.
BOXES = [[[c / 64 for c in box] for box in sample] for sample in (
    [[3, 6, 29, 38], [NAN, 128, -64, 0], [19, 26, 45, 61]],
    [[6, 6, 32, 32], [0, 0, 64, 64], [13, 19, 26, 58]],
    [[0, 0, 64, 64], [33, 13, 35, 51], [38, 3, 64, 35]],
)]
MASKS = [[1, 0, 1], [0, 0, 0], [1, 1, 1]]


def _setup(fused, seed=0, **options):
    torch.manual_seed(seed)
    attn = Attention(query_dim=C, cross_attention_dim=D, heads=HEADS, dim_head=C // HEADS)
    attn = attn.double().eval().requires_grad_(False)
    block = ROICtrlBlock(C, heads=HEADS, position_dim=POS, grid=P, fused_blend=fused,
                         options=ArchitectureOptions(**options), fourier_freqs=FREQS)
    block = randomize_(block, seed).double()
    encoder = randomize_(BoxEncoder(POS, num_freqs=FREQS, hidden_dim=8), seed + 1).double()
    g = torch.Generator().manual_seed(seed + 2)
    hidden = torch.randn(B, H * W, C, generator=g, dtype=torch.float64)
    residual = torch.randn(B, H * W, C, generator=g, dtype=torch.float64)
    text = torch.randn(B, 7, D, generator=g, dtype=torch.float64)
    emb = torch.randn(B, len(BOXES[0]), L, D, generator=g, dtype=torch.float64)
    emb[0, 1] = 1e6  # padding may hold anything
    return attn, block, encoder, hidden, residual, text, emb


def _run_block(attn, block, encoder, hidden, residual, text, emb, scale):
    inst = ROICtrlInstances(torch.tensor(BOXES, dtype=torch.float64), emb, torch.tensor(MASKS), scale=scale)
    global_out = attn(hidden, encoder_hidden_states=text)
    out, stats = block(hidden, residual, global_out, attn, inst, (H, W), encoder(inst.instance_boxes), text)
    return out, stats["base_weight"]


def _run_oracle(attn, block, encoder, hidden, residual, text, emb, scale, knockout=None):
    boxes, masks = torch.tensor(BOXES, dtype=torch.float64), torch.tensor(MASKS).bool()
    # padded boxes hold garbage (NaN): keep it out of the encoder, whose tokens for them are never used
    tokens = box_tokens(dict(encoder.named_parameters()), torch.where(masks[..., None], boxes, 0.0), FREQS)
    return oracle_layer(attn, dict(block.named_parameters()), HEADS, P, LayerInputs(hidden, residual, text, (H, W)),
                        boxes, emb, masks, tokens, scale, knockout, grid_policy=block.options.grid_policy,
                        guidance_pool=block.options.guidance_pool,
                        guidance_kv_pool=block.options.guidance_kv_pool,
                        guidance_feed_forward=block.options.guidance_feed_forward,
                        guidance_keys=block.options.guidance_keys, fourier_freqs=FREQS)


def _assert_close(actual, expected, what):
    scale = max(1.0, float(expected.detach().abs().max()))
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL * scale, msg=lambda m: f"{what}: {m}")


#: the options of a new adapter (footprint grids, pooled guidance) and the fixed grids with pooled guidance
NEW_OPTIONS = dict(grid_policy="footprint", guidance_pool=2)


@pytest.mark.parametrize("scale", [1.0, 0.6])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(
    "options",
    [{}, NEW_OPTIONS, {"guidance_pool": 3}, {"guidance_kv_pool": 2}, {"guidance_kv_pool": 3, "guidance_pool": 2},
     {"guidance_feed_forward": False}, {"guidance_keys": "positions", "guidance_feed_forward": False},
     {"guidance_keys": "positions", "guidance_pool": 2}],
    ids=["fixed", "footprint", "pool3", "kv_pool2", "kv_pool3_pool2", "no_ff", "position_keys", "position_keys_pool2"],
)
def test_block_matches_oracle_forward_and_gradients(fused, scale, options):
    attn, block, encoder, hidden, residual, text, emb = _setup(fused, **options)
    hidden.requires_grad_(), residual.requires_grad_()
    out, base_weight = _run_block(attn, block, encoder, hidden, residual, text, emb, scale)
    ref, ref_weight = _run_oracle(attn, block, encoder, hidden, residual, text, emb, scale)
    _assert_close(out, ref, "block output")
    _assert_close(base_weight, ref_weight, "base_weight")
    assert bool((ref_weight < 1).any()) and bool((ref_weight[1] == 1).all())

    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    cot_w = torch.randn(base_weight.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    named = [*(("block." + n, p) for n, p in block.named_parameters()),
             *(("encoder." + n, p) for n, p in encoder.named_parameters()), ("hidden", hidden), ("residual", residual)]
    wrt = [p for _, p in named]
    grads = torch.autograd.grad((out, base_weight), wrt, (cot, cot_w))
    ref_grads = torch.autograd.grad((ref, ref_weight), wrt, (cot, cot_w))
    for (name, _), got, exp in zip(named, grads, ref_grads):
        assert float(exp.abs().max()) > 0, f"{name}: the oracle gives no gradient, the comparison would be empty"
        _assert_close(got, exp, f"gradient of {name}")


@pytest.mark.parametrize("knockout", KNOCKOUTS)
def test_every_oracle_step_is_exercised(knockout):
    """Each single-step deviation of the oracle misses the block by far more than the tolerance: the setting
    above drives every step hard enough that getting it wrong in the block fails the comparison."""
    attn, block, encoder, hidden, residual, text, emb = _setup(True)
    with torch.no_grad():
        scale = 0.6
        out, _ = _run_block(attn, block, encoder, hidden, residual, text, emb, scale)
        wrong, _ = _run_oracle(attn, block, encoder, hidden, residual, text, emb, scale, knockout)
    gap = float((out - wrong).abs().max()) / max(1.0, float(out.abs().max()))
    assert gap > 1e4 * RTOL, f"{knockout}: the block and the deviated oracle differ by only {gap:.3g}"


# --------------------------------------------------------------------------- through a UNet


class OracleHooks:
    """Forward hooks of this test (not the adapter's) that replace every cross-attention output of a UNet by the
    oracle's, reading the adapter's weights; the UNet is called without any ``roictrl`` argument."""

    def __init__(self, unet, adapter, data):
        self.adapter, self.data, self.calls = adapter, data, 0
        self.handles, self.residual, self.sizes = [], {}, {}
        for i, spec in enumerate(adapter.specs):
            block = unet.get_submodule(spec.name)
            parent = unet.get_submodule(spec.name.rsplit(".transformer_blocks.", 1)[0])
            self.handles += [
                parent.register_forward_pre_hook(self._size, with_kwargs=True),
                block.norm2.register_forward_pre_hook(lambda m, args, i=i: self.residual.__setitem__(i, args[0])),
                block.attn2.register_forward_hook(lambda m, args, kwargs, out, i=i: self._attn2(i, m, args, kwargs),
                                                  with_kwargs=True),
            ]

    def _size(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.sizes[x.shape[2] * x.shape[3]] = tuple(x.shape[2:])

    def _attn2(self, i, attn, args, kwargs):
        self.calls += 1
        hidden = args[0] if args else kwargs["hidden_states"]
        text = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
        spec, block, data = self.adapter.specs[i], self.adapter.blocks[i], self.data
        masks = data["masks"].bool()
        boxes = torch.where(masks[..., None], data["boxes"], 0.0)
        tokens = box_tokens(dict(self.adapter.box_encoder.named_parameters()), boxes, self.adapter.fourier_freqs)
        inputs = LayerInputs(hidden, self.residual[i], text, self.sizes[hidden.shape[1]])
        out, _ = oracle_layer(attn, dict(block.named_parameters()), spec.heads, spec.grid, inputs, data["boxes"],
                              data["embeddings"], masks, tokens, data.get("scale", 1.0),
                              grid_policy=block.options.grid_policy, guidance_pool=block.options.guidance_pool,
                              guidance_kv_pool=block.options.guidance_kv_pool,
                              guidance_feed_forward=block.options.guidance_feed_forward,
                              guidance_keys=block.options.guidance_keys, fourier_freqs=self.adapter.fourier_freqs)
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("scale", [1.0, 0.7])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_unet_with_adapter_matches_oracle_hooks(kind, fused, scale):
    _check_unet_against_oracle_hooks(kind, fused, scale)


def test_unet_with_guidance_kv_pool_at_the_finest_level_matches_oracle_hooks():
    _check_unet_against_oracle_hooks("sd15", True, 1.0, guidance_keys="visual", guidance_kv_pool=2,
                                     guidance_kv_pool_scope="finest")


def test_unet_with_position_keys_and_no_feed_forward_matches_oracle_hooks():
    _check_unet_against_oracle_hooks("sd15", True, 1.0, guidance_keys="positions", guidance_feed_forward=False)


def _check_unet_against_oracle_hooks(kind, fused, scale, **options):
    unet = make_unet(kind).double()
    adapter = make_adapter(unet, kind, fused_blend=fused, **options).double()
    sample, t, text, extra = unet_inputs(kind, batch=2)
    sample, text = sample.double(), text.double()
    extra = {k: {n: v.double() for n, v in d.items()} for k, d in extra.items()}
    D = unet.config.cross_attention_dim
    # sample 0: three instances around a padded slot; sample 1 (the unconditional half of CFG): none
    data = make_instances(2, 4, D, masks=[[1, 0, 1, 1], [0, 0, 0, 0]])
    data["boxes"] = (data["boxes"].double() * 64).round() / 64  # exact in float32 (roictrl_oracle.box_tokens)
    data["embeddings"], data["scale"] = data["embeddings"].double(), scale
    params = list(adapter.parameters())
    cot = torch.randn(sample.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    adapter.install(unet)
    try:
        out = unet(sample, t, text, cross_attention_kwargs={"roictrl": data}, **extra).sample
    finally:
        adapter.uninstall(unet)
    grads = torch.autograd.grad(out, params, cot)

    hooks = OracleHooks(unet, adapter, data)
    try:
        ref = unet(sample, t, text, **extra).sample
    finally:
        hooks.remove()
    assert hooks.calls == len(adapter.specs)
    ref_grads = torch.autograd.grad(ref, params, cot)

    base = unet(sample, t, text, **extra).sample
    assert float((ref - base).detach().abs().max()) > 1e-3  # the instances matter...
    assert torch.equal(out[1], base[1])  # ...and not to the sample without any
    _assert_close(out, ref, f"{kind} UNet output")
    for (name, _), got, exp in zip(adapter.named_parameters(), grads, ref_grads):
        assert float(exp.abs().max()) > 0, f"{name}: the oracle gives no gradient"
        _assert_close(got, exp, f"{kind}: gradient of {name}")
