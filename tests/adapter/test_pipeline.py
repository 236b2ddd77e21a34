"""ROICtrlPipeline end to end on tiny random-weight pipelines (2 denoising steps on the CPU, no download)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import tiny_pipelines as tp
from roi_ops.roictrl_adapter import Instance, ROICtrlAdapter, ROICtrlPipeline, blend, normalize_instances
from roi_ops.roictrl_adapter.hooks import transformer_blocks
from roi_ops.roictrl_adapter import paste as paste_module
from roi_ops.roictrl_adapter.paste import instance_weights, paste_for_blend
from roi_ops.roictrl_adapter.pipeline import _schedule_length

CAT = {"box": [0.1, 0.1, 0.6, 0.7], "caption": "a cat"}
DOG = {"box": [0.5, 0.4, 0.95, 0.9], "caption": "a brown dog"}
STEPS = dict(num_inference_steps=2, output_type="np")


def seed(s: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(s)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pipe = tp.make_sd_pipeline(tmp_path_factory.mktemp("sd"))
    return pipe, ROICtrlPipeline.from_pipe(pipe, tp.make_pipeline_adapter(pipe))


class Recorder:
    """What the first cross-attention block of the UNet receives at every UNet call.

    Registered before the pipeline installs the adapter, so it runs before the adapter's own block hook takes the
    ``"roictrl"`` entry out of ``cross_attention_kwargs``.
    """

    def __init__(self, unet):
        _, block = transformer_blocks(unet)[0]
        self.calls: list[tuple[torch.Tensor, object]] = []
        self.handle = block.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ehs = kwargs["encoder_hidden_states"]
        if isinstance(ehs, tuple):  # IP-Adapter: (text, [image tokens])
            ehs = ehs[0]
        self.calls.append((ehs.detach().clone(), (kwargs.get("cross_attention_kwargs") or {}).get("roictrl")))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def embed(pipe, prompts, n_images=1):
    return pipe.encode_prompt(prompt=prompts, device="cpu", num_images_per_prompt=n_images,
                              do_classifier_free_guidance=False)[0]


def check_cfg_order(pipe, calls, prompts, negatives, layouts, n_images=1, cfg=True):
    """Every UNet call got the instances on exactly the samples whose text is the (positive) prompt, in the
    order diffusers repeats prompts, and none on the samples whose text is the negative prompt.

    The samples are identified by their encoder_hidden_states, not by position: this fails if the instances
    land on the unconditional half, on both halves, or on the wrong prompt."""
    pos = embed(pipe, prompts, n_images)
    N = pos.shape[0]
    expected = [row for row in layouts for _ in range(n_images)]
    assert calls, "the UNet was never called"
    for ehs, inst in calls:
        assert inst is not None, "the UNet call got no instances"
        assert ehs.shape[0] == (2 * N if cfg else N)
        cond = list(range(N, 2 * N)) if cfg else list(range(N))
        assert torch.equal(ehs[cond], pos)  # these rows are the conditional samples...
        if cfg:
            neg = embed(pipe, negatives, n_images)
            assert torch.equal(ehs[:N], neg)  # ...and these the unconditional ones
        with_instances = [s for s in range(ehs.shape[0]) if bool(inst.masks[s].any())]
        assert with_instances == [c for c, row in zip(cond, expected) if row]
        for c, row in zip(cond, expected):
            got = inst.boxes[c][inst.masks[c]]
            assert torch.allclose(got, torch.tensor([i["box"] for i in row]).reshape(-1, 4))
            # each instance's embedding is its own caption through the pipeline's text encoder(s)
            want = embed(pipe, [i["caption"] for i in row]) if row else got.new_zeros(0)
            assert torch.equal(inst.embeddings[c][inst.masks[c]], want.reshape(inst.embeddings[c][inst.masks[c]].shape))


# ------------------------------------------------------------------ SD1.x


def test_zero_instances_is_the_base_pipeline_bitwise(sd):
    pipe, roictrl = sd
    base = pipe("a room", negative_prompt="blurry", generator=seed(), **STEPS).images
    for empty in (None, [], [[]]):
        out = roictrl("a room", instances=empty, negative_prompt="blurry", generator=seed(), **STEPS).images
        assert (out == base).all()
    with_inst = roictrl("a room", instances=[CAT], negative_prompt="blurry", generator=seed(), **STEPS).images
    assert not (with_inst == base).all()


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_instances_on_the_conditional_half_only(sd, guidance_scale):
    pipe, roictrl = sd
    base = pipe("a room", negative_prompt="blurry", guidance_scale=guidance_scale, generator=seed(), **STEPS).images
    with Recorder(pipe.unet) as rec:
        out = roictrl("a room", instances=[CAT, DOG], negative_prompt="blurry", guidance_scale=guidance_scale,
                      generator=seed(), **STEPS).images
    assert len(rec.calls) == 2
    check_cfg_order(pipe, rec.calls, ["a room"], ["blurry"], [[CAT, DOG]], cfg=guidance_scale > 1)
    assert not (out == base).all()


def test_num_images_per_prompt_and_several_prompts(sd):
    pipe, roictrl = sd
    prompts, negatives = ["a room", "a garden"], ["blurry", "dark"]
    layouts = [[CAT, DOG], [DOG]]
    with Recorder(pipe.unet) as rec:
        out = roictrl(prompts, instances=layouts, negative_prompt=negatives, num_images_per_prompt=2,
                      generator=seed(), return_blend_maps=True, **STEPS)
    assert out.images.shape[0] == 4
    check_cfg_order(pipe, rec.calls, prompts, negatives, layouts, n_images=2)
    assert [m.shape for m in out.blend_maps] == [(2, 64, 64), (2, 64, 64), (1, 64, 64), (1, 64, 64)]
    # one prompt without instances among others
    with Recorder(pipe.unet) as rec:
        roictrl(prompts, instances=[[], [DOG]], negative_prompt=negatives, generator=seed(), **STEPS)
    check_cfg_order(pipe, rec.calls, prompts, negatives, [[], [DOG]])


def test_scheduled_sampling_switches_the_adapter_off_at_the_right_step(sd):
    pipe, roictrl = sd
    kw = dict(num_inference_steps=4, output_type="np", negative_prompt="blurry")
    base = pipe("a room", generator=seed(), **kw).images
    full = roictrl("a room", instances=[CAT], generator=seed(), **kw).images
    for beta, active in [(1.0, [0, 1, 2, 3]), (0.5, [0, 1]), (0.74, [0, 1]), (0.25, [0]), (0.0, [])]:
        with Recorder(pipe.unet) as rec:
            out = roictrl("a room", instances=[CAT], roictrl_scheduled_sampling_beta=beta, generator=seed(), **kw)
        assert [i for i, (_, inst) in enumerate(rec.calls) if inst is not None] == active, beta
        assert roictrl.last_active_steps == active
        if beta == 0.0:
            assert (out.images == base).all()
        elif beta < 1.0:
            assert not (out.images == base).all() and not (out.images == full).all()
    with pytest.raises(ValueError, match=r"roictrl_scheduled_sampling_beta must be a finite number in \[0, 1\], got 1.5"):
        roictrl("a room", instances=[CAT], roictrl_scheduled_sampling_beta=1.5, **kw)


def test_scheduled_sampling_counts_steps_of_second_order_schedulers(sd):
    from diffusers import HeunDiscreteScheduler

    pipe, roictrl = sd
    assert _schedule_length(torch.tensor([999.0, 500.0, 500.0, 1.0, 1.0])) == 3
    original = pipe.scheduler
    pipe.scheduler = HeunDiscreteScheduler.from_config(original.config)
    try:
        with Recorder(pipe.unet) as rec:  # Heun, 2 steps: timesteps [t0, t1, t1], the UNet runs 3 times
            roictrl("a room", instances=[CAT], roictrl_scheduled_sampling_beta=0.5, generator=seed(), **STEPS)
    finally:
        pipe.scheduler = original
    assert [inst is not None for _, inst in rec.calls] == [True, False, False]


def _unet_snapshot(unet):
    return (
        {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in unet.named_modules()},
        {k: type(v) for k, v in unet.attn_processors.items()},
        {k: v.clone() for k, v in unet.state_dict().items()},
    )


def _same(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_unet_is_left_as_found(sd):
    pipe, roictrl = sd
    adapter = roictrl.adapter
    before = _unet_snapshot(pipe.unet)
    roictrl("a room", instances=[CAT], generator=seed(), return_blend_maps=True, **STEPS)
    _same(before, _unet_snapshot(pipe.unet))
    assert not adapter.is_installed and adapter.enabled
    assert adapter.blend_recorder is None  # the call's recording ended with it

    def boom(*args):
        raise KeyboardInterrupt("stop")

    adapter.enabled = False  # restored as found too
    with pytest.raises(KeyboardInterrupt):
        roictrl("a room", instances=[CAT], callback_on_step_end=boom, return_blend_maps=True, **STEPS)
    _same(before, _unet_snapshot(pipe.unet))
    assert not adapter.is_installed and adapter.enabled is False
    adapter.enabled = True

    # an adapter the user installed stays installed (and is used)
    base = pipe("a room", generator=seed(), **STEPS).images
    adapter.install(pipe.unet)
    try:
        installed = _unet_snapshot(pipe.unet)
        out = roictrl("a room", instances=[CAT], generator=seed(), **STEPS).images
        _same(installed, _unet_snapshot(pipe.unet))
        assert adapter.is_installed and not (out == base).all()
    finally:
        adapter.uninstall()
    # another adapter on the UNet: refused, nothing changed
    other = tp.make_pipeline_adapter(pipe, seed=3).install(pipe.unet)
    try:
        with pytest.raises(RuntimeError, match="already has another ROICtrlAdapter installed"):
            roictrl("a room", instances=[CAT], **STEPS)
        assert not adapter.is_installed
    finally:
        other.uninstall()
    _same(before, _unet_snapshot(pipe.unet))


def test_blend_maps(sd):
    pipe, roictrl = sd
    out = roictrl("a room", instances=[CAT, {"box": [0.0, 0.0, 0.3, 0.3], "caption": "a lamp"}], generator=seed(),
                  return_blend_maps=True, **STEPS)
    (maps,) = out.blend_maps
    assert maps.shape == (2, 64, 64) and maps.dtype == torch.float32
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1 and float(maps.sum(0).max()) <= 1 + 1e-5
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[6:45, 6:38] = True  # CAT's box, a margin in from its edges (the maps are upsampled bilinearly)
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[:61, :55] = False  # beyond the box by more than a pixel of the coarsest (4x4, 16 px) layer
    assert float(maps[0][inside].min()) > 0 and float(maps[0][outside].max()) == 0
    tup = roictrl("a room", instances=[CAT], generator=seed(), return_blend_maps=True, return_dict=False, **STEPS)
    assert isinstance(tup[-1], list) and tup[-1][0].shape == (1, 64, 64)
    assert "blend_maps" not in roictrl("a room", instances=[CAT], generator=seed(), **STEPS)


def test_blend_maps_official_configuration(sd, monkeypatch):
    """With the official architecture (quantised paste, channel gate), the maps are made from the official paste
    and its value-dependent coverage, as the blend was: every paste of the call is the official one."""
    pipe, _ = sd
    adapter = tp.make_pipeline_adapter(pipe, preset="official", position_dim=64, position_hidden_dim=16)
    roictrl = ROICtrlPipeline.from_pipe(pipe, adapter)
    modes = []

    for rule in (paste_module.EXACT, paste_module.OFFICIAL):
        def spy(self, *args, _original=type(rule).paste_for_blend, **kwargs):
            modes.append(self.name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(type(rule), "paste_for_blend", spy)
    out = roictrl("a room", instances=[CAT], generator=seed(), return_blend_maps=True, **STEPS)
    (maps,) = out.blend_maps
    assert maps.shape == (1, 64, 64)
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1 and float(maps.max()) > 0
    # the blend and the maps' record, at every layer and step
    assert len(modes) >= 2 * len(adapter.blocks) and set(modes) == {"official"}, modes


@pytest.mark.parametrize("unpool", ["exact", "official"])
def test_instance_weights_reconstruct_the_blend(unpool):
    """The per-instance weights the maps are made of are the blend's own: base_weight * global + sum_k w_k *
    pasted v_k gives back blend()'s output, and the weights of a pixel sum to 1; with the official paste too
    (quantised, and an instance whose values are all 0 covers nothing by the official rule)."""
    g = torch.Generator().manual_seed(0)
    B, C, H, W, P = 2, 3, 9, 11, 4
    base = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    base_logit = torch.randn(B, H, W, generator=g, dtype=torch.float64) * 3
    values = torch.randn(4, C, P, P, generator=g, dtype=torch.float64)
    values[3] = 0
    logits = torch.randn(4, P, P, generator=g, dtype=torch.float64) * 3
    boxes = torch.tensor([[0, 1.0, 2.0, 7.0, 8.0], [0, 4.0, 0.5, 10.0, 6.0], [1, 2.0, 2.0, 9.0, 5.0],
                          [1, 0.0, 0.0, 5.0, 4.0]], dtype=torch.float64)
    out, base_weight = blend(base, base_logit, values, logits, boxes, 1.0, True, unpool)
    pasted, pasted_logits, covered = paste_for_blend(values, logits, boxes, (H, W), 1.0, True, unpool)
    w = instance_weights(base_weight, base_logit, pasted_logits, covered, boxes)
    if unpool == "official":
        assert float(w[3].abs().max()) == 0  # all-zero values: the global output keeps those pixels
        # the quantised paste differs from the exact one: the maps must not be the exact-paste weights
        exact_w = instance_weights(base_weight, base_logit, *paste_for_blend(values, logits, boxes, (H, W), 1.0,
                                                                             True)[1:], boxes)
        assert float((exact_w[:3] - w[:3]).abs().max()) > 1e-3
    rebuilt = base_weight.unsqueeze(1) * base
    rebuilt = rebuilt.index_add(0, boxes[:, 0].long(), w.unsqueeze(1) * pasted)
    torch.testing.assert_close(rebuilt, out, rtol=1e-10, atol=1e-10)
    total = base_weight.index_add(0, boxes[:, 0].long(), w)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-12, atol=1e-12)


def test_compiled_unet_fullgraph(sd):
    """A torch.compile'd UNet (fullgraph=True: any graph break fails) runs the pipeline with instances and gives
    the eager result; the wrapper's own hooks stay outside the graph, the adapter's are traced."""
    pipe, roictrl = sd
    want = roictrl("a room", instances=[CAT, DOG], generator=seed(), **STEPS).images
    original = pipe.unet
    pipe.unet = torch.compile(original, backend="eager", fullgraph=True)
    try:
        got = roictrl("a room", instances=[CAT, DOG], generator=seed(), **STEPS).images
    finally:
        pipe.unet = original
        torch._dynamo.reset()
    assert not roictrl.adapter.is_installed
    assert abs(got - want).max() < 1e-5 and not (got == pipe("a room", generator=seed(), **STEPS).images).all()


# ------------------------------------------------------------------ input checking


def norm(instances, n=1, **kw):
    return normalize_instances(instances, n, width=kw.pop("width", 64), height=kw.pop("height", 32), **kw)


def test_box_formats_and_units():
    (row,) = norm([Instance((8, 4, 40, 28), "a"), {"box": (16, 8, 32, 24), "caption": "b"}],
                  box_units="pixels", box_format="xyxy")
    assert row == [Instance((0.125, 0.125, 0.625, 0.875), "a"), Instance((0.25, 0.25, 0.5, 0.75), "b")]
    (row,) = norm([{"box": [0.1, 0.2, 0.5, 0.25], "caption": "c"}], box_format="xywh")
    assert row[0].box == pytest.approx((0.1, 0.2, 0.6, 0.45))
    (row,) = norm([{"box": [16, 8, 32, 16], "caption": "d"}], box_format="xywh", box_units="pixels")
    assert row[0].box == pytest.approx((0.25, 0.25, 0.75, 0.75))
    assert norm(None, 2) == [[], []] and norm([], 3) == [[], [], []]
    assert norm([[{"box": torch.tensor([0, 0, 1, 1]), "caption": "e"}], []], 2)[1] == []


@pytest.mark.parametrize(
    "instances, kwargs, error, message",
    [
        ([{"box": [10, 20, 200, 300], "caption": "a"}], {}, ValueError,
         r"instances\[0\]\[0\] box .* goes outside the image; it looks like pixel coordinates: pass "
         r"box_units='pixels' \(the image is 64x32\)"),
        ([{"box": [-0.05, 0.1, 0.5, 1.02], "caption": "a"}], {}, ValueError,
         r"instances\[0\]\[0\] box .* goes outside the image; pass clip_boxes=True"),
        ([{"box": [0, 0, 70, 10], "caption": "a"}], {"box_units": "pixels"}, ValueError, "goes outside the image"),
        ([{"box": [0.1, 0.2, 0.3], "caption": "a"}], {}, ValueError, r"instances\[0\]\[0\] box must be 4 numbers"),
        ([{"box": [0.1, 0.2, 0.3, float("nan")], "caption": "a"}], {}, ValueError, "box must be finite"),
        ([{"box": "0 0 1 1", "caption": "a"}], {}, ValueError, "box must be 4 numbers"),
        ([{"box": [0.5, 0.2, 0.3, 0.4], "caption": "a"}], {}, ValueError, "must have x1 <= x2 and y1 <= y2"),
        ([{"box": [0.5, 0.2, -0.3, 0.4], "caption": "a"}], {"box_format": "xywh"}, ValueError,
         "negative width or height"),
        ([{"box": [0, 0, 1, 1], "caption": "  "}], {}, ValueError, r"instances\[0\]\[0\] caption must be a non-empty"),
        ([{"box": [0, 0, 1, 1], "caption": 3}], {}, ValueError, "caption must be a non-empty string"),
        ([{"box": [0, 0, 1, 1]}], {}, ValueError, r"must have the keys 'box' and 'caption'; missing \['caption'\]"),
        ([{"box": [0, 0, 1, 1], "caption": "a", "phrase": "b"}], {}, ValueError, r"unknown \['phrase'\]"),
        ([(0, 0, 1, 1)], {}, TypeError, r"instances\[0\]\[0\] must be an Instance or a dict"),
        ({"box": [0, 0, 1, 1], "caption": "a"}, {}, TypeError, "instances must be a list"),
        ([[CAT], CAT], {}, TypeError, r"instances\[1\] must be a list of instances"),
        ([[CAT], [CAT]], {}, ValueError, "instances has 2 lists but there are 1 prompts"),
        ([CAT], {"box_format": "cxcywh"}, ValueError, r"box_format must be one of \('xyxy', 'xywh'\)"),
        ([CAT], {"box_units": "percent"}, ValueError, "box_units must be one of"),
    ],
)
def test_bad_instances_say_what_is_wrong(instances, kwargs, error, message):
    with pytest.raises(error, match=message):
        norm(instances, **kwargs)


def test_flat_list_needs_one_prompt():
    with pytest.raises(ValueError, match="instances is a flat list but there are 2 prompts"):
        norm([CAT], 2)


def test_clip_boxes_clamps_and_warns():
    with pytest.warns(UserWarning, match=r"clip_boxes=True clamped 1 box\(es\) to the image: instances\[0\]\[1\]"):
        (row,) = norm([CAT, {"box": [-0.02, 0.5, 1.03, 1.1], "caption": "a"}], clip_boxes=True)
    assert row[1].box == (0.0, 0.5, 1.0, 1.0) and row[0].box == tuple(CAT["box"])


def test_pipeline_checks_inputs_before_running(sd):
    pipe, roictrl = sd
    with Recorder(pipe.unet) as rec:
        with pytest.raises(ValueError, match="looks like pixel coordinates"):
            roictrl("a room", instances=[{"box": [5, 5, 40, 40], "caption": "a cat"}], **STEPS)
        with pytest.raises(ValueError, match="instances is a flat list but there are 2 prompts"):
            roictrl(["a", "b"], instances=[CAT], **STEPS)
        with pytest.raises(ValueError, match="num_images_per_prompt must be a positive int, got 0"):
            roictrl("a room", instances=[CAT], num_images_per_prompt=0, **STEPS)
        with pytest.raises(ValueError, match="needs prompt"):
            roictrl(instances=[CAT], **STEPS)
    assert rec.calls == []
    # pixel boxes are read against the generated size (height/width given here)
    with Recorder(pipe.unet) as rec:
        roictrl("a room", instances=[{"box": [0, 0, 32, 16], "caption": "a cat"}], box_units="pixels",
                height=64, width=128, **STEPS)
    assert torch.allclose(rec.calls[0][1].instance_boxes, torch.tensor([[0.0, 0.0, 0.25, 0.25]]))


def test_a_box_smaller_than_a_feature_pixel_warns(sd):
    _, roictrl = sd
    tiny = {"box": [0.33, 0.33, 0.36, 0.36], "caption": "a speck"}  # between pixel centres of both maps
    with pytest.warns(UserWarning, match=r"instances\[0\]\[1\] box .* covers no pixel of any adapter layer's feature "
                                         r"map \(sizes \[\(4, 4\), \(8, 8\)\]\)"):
        roictrl("a room", instances=[CAT, tiny], **STEPS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a normal box does not warn
        roictrl("a room", instances=[CAT], **STEPS)


def test_the_tiny_box_warning_asks_the_adapters_paste_rule(sd, monkeypatch):
    """The tiny-box check uses the adapter's own paste rule, with each layer's grid (the official rule's zeroed
    rims depend on it), not the exact rule whatever the adapter."""
    pipe, _ = sd
    adapter = tp.make_pipeline_adapter(pipe, preset="official", position_dim=64, position_hidden_dim=16)
    asked = []
    original = type(paste_module.OFFICIAL).coverage

    def spy(self, boxes, batch_size, size, grid=1, aligned=True):
        asked.append((self.name, tuple(size), grid))
        return original(self, boxes, batch_size, size, grid, aligned)

    monkeypatch.setattr(type(paste_module.OFFICIAL), "coverage", spy)
    monkeypatch.setattr(type(paste_module.EXACT), "coverage", spy)
    ROICtrlPipeline.from_pipe(pipe, adapter)("a room", instances=[CAT], **STEPS)
    assert {name for name, _, _ in asked} == {"official"}
    assert {(size, grid) for _, size, grid in asked} == {((4, 4), tp.GRIDS[16]), ((8, 8), tp.GRIDS[8])}


def test_from_pipe_checks_the_adapter(sd, tmp_path):
    pipe, _ = sd
    xl = tp.make_unet(tp.SDXL_UNET)
    with pytest.raises(ValueError, match="ROICtrlAdapter does not fit"):
        ROICtrlPipeline.from_pipe(pipe, ROICtrlAdapter.from_unet(xl, grid_sizes=tp.GRIDS))
    with pytest.raises(TypeError, match="adapter must be a ROICtrlAdapter"):
        ROICtrlPipeline.from_pipe(pipe, "adapter")
    with pytest.raises(TypeError, match="has no 'unet'"):
        ROICtrlPipeline.from_pipe(object(), tp.make_pipeline_adapter(pipe))
    # the adapter follows the UNet's dtype, at from_pipe and at to()
    adapter = tp.make_pipeline_adapter(pipe).double()
    wrapped = ROICtrlPipeline.from_pipe(pipe, adapter)
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    assert wrapped.scheduler is pipe.scheduler and wrapped.pipe is pipe  # the rest is the pipeline's
    try:
        wrapped.to(torch.float64)
        assert all(p.dtype == torch.float64 for p in adapter.parameters())
    finally:
        pipe.to(torch.float32)


# ------------------------------------------------------------------ other pipeline classes


def _run_variant(pipe, extra, cfg_prompts=("a room",)):
    roictrl = ROICtrlPipeline.from_pipe(pipe, tp.make_pipeline_adapter(pipe))
    kw = dict(negative_prompt="blurry", **STEPS, **extra)
    base = pipe("a room", generator=seed(), **kw).images
    assert (roictrl("a room", instances=[], generator=seed(), **kw).images == base).all()
    with Recorder(pipe.unet) as rec:
        out = roictrl("a room", instances=[CAT, DOG], generator=seed(), **kw).images
    check_cfg_order(pipe, rec.calls, ["a room"], ["blurry"], [[CAT, DOG]])
    assert not (out == base).all()
    return roictrl


def test_sdxl(tmp_path, diffusers_log):
    pipe = tp.make_sdxl_pipeline(tmp_path)
    _run_variant(pipe, {})
    # the instance captions go through both text encoders, concatenated as the UNet takes them
    assert embed(pipe, ["a cat"]).shape[-1] == pipe.unet.config.cross_attention_dim == 32
    assert not [m for m in diffusers_log if "roictrl" in m]


def test_controlnet(tmp_path, diffusers_log):
    pipe = tp.make_controlnet_pipeline(tmp_path)
    _run_variant(pipe, {"image": tp.control_image()})
    assert not [m for m in diffusers_log if "roictrl" in m]


def test_t2i_adapter(tmp_path):
    pipe = tp.make_t2i_adapter_pipeline(tmp_path)
    _run_variant(pipe, {"image": tp.control_image()})


def test_ip_adapter(tmp_path, diffusers_log):
    pipe = tp.add_ip_adapter(tp.make_sd_pipeline(tmp_path))
    calls = []
    handles = [
        m.register_forward_pre_hook(lambda m, a, k: calls.append(k["encoder_hidden_states"]), with_kwargs=True)
        for _, m in transformer_blocks(pipe.unet)[:1]
    ]
    try:
        _run_variant(pipe, {"ip_adapter_image": tp.control_image()})
    finally:
        for h in handles:
            h.remove()
    assert calls and all(isinstance(c, tuple) for c in calls)  # the IP-Adapter's image tokens reached the UNet
    assert not [m for m in diffusers_log if "roictrl" in m]
    pipe.set_ip_adapter_scale(0.0)
    ROICtrlPipeline.from_pipe(pipe, tp.make_pipeline_adapter(pipe))  # still wraps after a change of scale
