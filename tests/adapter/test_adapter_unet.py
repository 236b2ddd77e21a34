"""The adapter installed in tiny SD1.5-like and SDXL-like UNets: exactness, locality, gradients, plug-ins."""

import math

import pytest
import torch
from diffusers import ControlNetModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from roictrl_testutils import CONFIGS, make_adapter, make_instances, make_unet, unet_inputs


KINDS = ["sd15", "sdxl"]


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def unet(kind):
    return make_unet(kind)


def _run(unet, kind, roictrl=None, size=(16, 12), batch=2, **kw):
    sample, t, text, extra = unet_inputs(kind, batch=batch, size=size)
    cak = None if roictrl is None else {"roictrl": roictrl}
    return unet(sample, t, text, cross_attention_kwargs=cak, **extra, **kw).sample


def _dim(kind):
    return CONFIGS[kind]["cross_attention_dim"]


def _hook_counts(module):
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in module.named_modules()}


class _Installed:
    def __init__(self, adapter, unet):
        self.adapter, self.unet = adapter, unet

    def __enter__(self):
        return self.adapter.install(self.unet)

    def __exit__(self, *exc):
        self.adapter.uninstall(self.unet)


def test_no_instances_or_all_masked_give_the_base_output_exactly(unet, kind):
    base = _run(unet, kind)
    adapter = make_adapter(unet, kind)
    with _Installed(adapter, unet):
        assert torch.equal(_run(unet, kind), base)
        assert torch.equal(_run(unet, kind, make_instances(2, 3, _dim(kind), masks=torch.zeros(2, 3))), base)
        empty = {"boxes": torch.zeros(2, 0, 4), "embeddings": torch.zeros(2, 0, 5, _dim(kind))}
        assert torch.equal(_run(unet, kind, empty), base)
        assert torch.equal(_run(unet, kind, make_instances(2, 2, _dim(kind)) | {"scale": 0.0}), base)
        adapter.enabled = False
        assert torch.equal(_run(unet, kind, make_instances(2, 2, _dim(kind))), base)
        adapter.enabled = True
        assert not torch.equal(_run(unet, kind, make_instances(2, 2, _dim(kind))), base)


def test_uninstall_restores_the_unet_bitwise(unet, kind):
    base = _run(unet, kind)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    processors = dict(unet.attn_processors)
    modules = dict(unet.named_modules())
    hooks = _hook_counts(unet)
    adapter = make_adapter(unet, kind)
    adapter.install(unet)
    assert _hook_counts(unet) != hooks
    out = _run(unet, kind, make_instances(2, 2, _dim(kind)))
    out.sum().backward()
    adapter.uninstall(unet)
    assert _hook_counts(unet) == hooks
    assert dict(unet.named_modules()) == modules  # the very same module objects
    assert all(unet.attn_processors[k] is p for k, p in processors.items())
    assert unet.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in unet.parameters())
    assert torch.equal(_run(unet, kind), base)


def test_classifier_free_guidance_batch(unet, kind):
    """The unconditional half (no valid instance) goes through exactly the base computation."""
    base = _run(unet, kind)
    adapter = make_adapter(unet, kind)
    with _Installed(adapter, unet):
        out = _run(unet, kind, make_instances(2, 3, _dim(kind), masks=[[0, 0, 0], [1, 0, 1]]))
    assert torch.equal(out[0], base[0])
    assert not torch.equal(out[1], base[1])


def test_padded_instances_change_nothing(unet, kind):
    adapter = make_adapter(unet, kind)
    data = make_instances(2, 2, _dim(kind))
    padded = make_instances(2, 4, _dim(kind), seed=7)
    padded["boxes"][:, ::2] = data["boxes"]
    padded["embeddings"][:, ::2] = data["embeddings"]
    padded["boxes"][:, 1::2] = float("nan")  # padding may hold anything
    padded["masks"] = torch.tensor([[1, 0, 1, 0], [1, 0, 1, 0]])
    with _Installed(adapter, unet):
        assert torch.equal(_run(unet, kind, data), _run(unet, kind, padded))


def test_forward_and_backward_reach_every_adapter_parameter_and_no_base_parameter(unet, kind, diffusers_log):
    adapter = make_adapter(unet, kind)
    unet_params = {id(p) for p in unet.parameters()}
    assert not any(id(p) in unet_params for p in adapter.parameters())
    with _Installed(adapter, unet):
        out = _run(unet, kind, make_instances(2, 3, _dim(kind), masks=[[1, 1, 0], [0, 1, 1]]))
        reg = adapter.regularization_loss()
        (out.square().mean() + 0.01 * reg).backward()
    assert 0 < reg.item() < 1
    for name, p in adapter.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in unet.parameters())
    assert diffusers_log == []


def test_fresh_adapter_trains_from_zero_gates(unet, kind):
    adapter = make_adapter(unet, kind, randomize=False)
    with _Installed(adapter, unet):
        out = _run(unet, kind, make_instances(2, 2, _dim(kind)))
        out.square().mean().backward()
    gates = [p for n, p in adapter.named_parameters() if p.dim() == 0]
    assert gates and all(p.item() == 0 and p.grad is not None and p.grad != 0 for p in gates)


def test_no_processor_warns_about_the_roictrl_entry(unet, kind, diffusers_log):
    adapter = make_adapter(unet, kind)
    # The capture works: an entry nobody consumes is reported by diffusers.
    sample, t, text, extra = unet_inputs(kind)
    unet(sample, t, text, cross_attention_kwargs={"unknown_entry": 1}, **extra)
    assert any("unknown_entry" in m for m in diffusers_log)
    diffusers_log.clear()
    with _Installed(adapter, unet):
        _run(unet, kind, make_instances(2, 2, _dim(kind)))
        _run(unet, kind, make_instances(2, 2, _dim(kind), masks=torch.zeros(2, 2)))
        adapter.enabled = False
        _run(unet, kind, make_instances(2, 2, _dim(kind)))
        adapter.enabled = True
    assert diffusers_log == []


@pytest.mark.parametrize("size", [(16, 8), (8, 24), (10, 14)])
def test_non_square_latents(unet, kind, size):
    adapter = make_adapter(unet, kind)
    data = make_instances(2, 2, _dim(kind))
    with _Installed(adapter, unet):
        out = _run(unet, kind, data, size=size)
        assert out.shape[-2:] == size and torch.isfinite(out).all()
        weights = adapter.fusion_weights()
    assert len(weights) == len(adapter.specs)
    for spec in adapter.specs:
        # every layer saw the map of its own resolution, in the right orientation (stride-2 convs round up)
        h, w = size
        for _ in range(spec.downsample.bit_length() - 4):  # 8 -> 0 halvings, 16 -> 1, 32 -> 2
            h, w = -(-h // 2), -(-w // 2)
        assert weights[spec.name].shape == (2, h, w)


def test_classic_and_sdpa_processors_agree(kind):
    unet = make_unet(kind)
    adapter = make_adapter(unet, kind)
    data = make_instances(2, 2, _dim(kind))
    with _Installed(adapter, unet):
        unet.set_attn_processor(AttnProcessor2_0())
        sdpa = _run(unet, kind, data)
        unet.set_attn_processor(AttnProcessor())
        classic = _run(unet, kind, data)
    torch.testing.assert_close(classic, sdpa, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_output_and_gradients(kind):
    unet = make_unet(kind)
    adapter = make_adapter(unet, kind)
    data = make_instances(2, 2, _dim(kind))
    results = []
    with _Installed(adapter, unet):
        for checkpointing in (False, True):
            unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
            unet.train()
            adapter.zero_grad()
            out = _run(unet, kind, data)
            (out.square().mean() + adapter.regularization_loss()).backward()
            results.append((out.detach(), [p.grad.clone() for p in adapter.parameters()]))
    unet.disable_gradient_checkpointing()
    unet.eval()
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_default_grid_sizes_run(kind):
    unet = make_unet(kind)
    adapter = make_adapter(unet, kind, grid_sizes=None)
    assert {s.grid for s in adapter.specs} == ({25, 19} if kind == "sd15" else {19, 13})
    with _Installed(adapter, unet):
        out = _run(unet, kind, make_instances(1, 1, _dim(kind)), batch=1)
    assert torch.isfinite(out).all()


def test_install_twice_or_uninstall_twice_raise(unet, kind):
    adapter = make_adapter(unet, kind)
    adapter.install(unet)
    try:
        with pytest.raises(RuntimeError, match="already installed"):
            adapter.install(unet)
        with pytest.raises(ValueError, match="different UNet"):
            adapter.uninstall(make_unet(kind))
    finally:
        adapter.uninstall(unet)
    with pytest.raises(RuntimeError, match="not installed"):
        adapter.uninstall(unet)


def test_wrong_batch_and_wrong_dtype_raise(unet, kind):
    adapter = make_adapter(unet, kind)
    with _Installed(adapter, unet):
        with pytest.raises(ValueError, match="instances are for a batch of 3 but the UNet batch is 2"):
            _run(unet, kind, make_instances(3, 1, _dim(kind)))
        adapter.to(torch.float64)
        with pytest.raises(RuntimeError, match=r"ROICtrlAdapter is on cpu/torch.float64 but the UNet runs on cpu/torch.float32"):
            _run(unet, kind, make_instances(2, 1, _dim(kind)))
        adapter.to(torch.float32)
        assert torch.isfinite(_run(unet, kind, make_instances(2, 1, _dim(kind)))).all()


# ------------------------------------------------------------------------------------------ plug-ins
def test_with_controlnet():
    unet = make_unet("sd15")
    adapter = make_adapter(unet, "sd15")
    adapter.install(unet)
    try:
        # Built from the installed UNet: the ControlNet copies weights only, never the adapter's hooks.
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
        sample, t, text, _ = unet_inputs("sd15", size=(16, 12))
        cond = torch.rand(2, 3, 128, 96, generator=torch.Generator().manual_seed(0))
        data = make_instances(2, 2, _dim("sd15"))
        down, mid = controlnet(sample, t, text, controlnet_cond=cond, return_dict=False)
        down2, mid2 = controlnet(sample, t, text, controlnet_cond=cond, return_dict=False,
                                 cross_attention_kwargs=None)
        assert torch.equal(mid, mid2)
        residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        plain = unet(sample, t, text, **residuals).sample
        with_instances = unet(sample, t, text, cross_attention_kwargs={"roictrl": data}, **residuals).sample
        with_instances.square().mean().backward()
    finally:
        adapter.uninstall(unet)
    base = unet(sample, t, text, **residuals).sample
    assert torch.equal(plain, base)
    assert torch.isfinite(with_instances).all() and not torch.equal(with_instances, base)
    assert all(p.grad is not None for p in adapter.parameters())
    assert _hook_counts(controlnet) == {n: (0, 0) for n, _ in controlnet.named_modules()}


class _RecordingIPProcessor(IPAdapterAttnProcessor2_0):
    """IP-Adapter processor that notes the batch of every call and of the image tokens it got."""

    calls: list = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
        image = encoder_hidden_states[1][0] if isinstance(encoder_hidden_states, tuple) else None
        type(self).calls.append((hidden_states.shape[0], None if image is None else image.shape[0]))
        return super().__call__(attn, hidden_states, encoder_hidden_states, **kwargs)


def _with_ip_adapter(unet, image_dim=12, tokens=4, seed=0):
    torch.manual_seed(seed)
    D = unet.config.cross_attention_dim
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([ImageProjection(image_dim, D, tokens)])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    procs = {}
    for name, proc in unet.attn_processors.items():
        attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
        if name.endswith("attn2.processor"):
            procs[name] = _RecordingIPProcessor(attn.inner_dim, D, num_tokens=(tokens,), scale=0.7)
        else:
            procs[name] = AttnProcessor2_0()
    unet.set_attn_processor(procs)
    return unet.requires_grad_(False).eval()


def test_with_ip_adapter(diffusers_log):
    unet = _with_ip_adapter(make_unet("sd15"))
    # fixed grids: one instance-path call per layer, which the counts below rely on (footprint grids split the
    # 3 instances into calls by grid size, each routed the same way)
    adapter = make_adapter(unet, "sd15", grid_policy="fixed")
    sample, t, text, _ = unet_inputs("sd15")
    image = [torch.randn(2, 1, 12, generator=torch.Generator().manual_seed(5))]
    data = make_instances(2, 3, _dim("sd15"), masks=[[1, 1, 0], [0, 1, 0]])
    base = unet(sample, t, text, added_cond_kwargs={"image_embeds": image}).sample
    with _Installed(adapter, unet):
        assert torch.equal(unet(sample, t, text, added_cond_kwargs={"image_embeds": image}).sample, base)
        _RecordingIPProcessor.calls.clear()
        out = unet(sample, t, text, added_cond_kwargs={"image_embeds": image},
                   cross_attention_kwargs={"roictrl": data}).sample
        out.square().mean().backward()
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    # Every layer ran the IP-Adapter processor on the 3 instance crops too, each with its own sample's image tokens.
    assert _RecordingIPProcessor.calls.count((3, 3)) == len(adapter.specs)
    assert _RecordingIPProcessor.calls.count((2, 2)) == len(adapter.specs)
    assert all(p.grad is not None for p in adapter.parameters())
    assert diffusers_log == []


class _RecordingProcessor(AttnProcessor2_0):
    calls: list = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
        type(self).calls.append((attn, hidden_states.shape, encoder_hidden_states))
        return super().__call__(attn, hidden_states, encoder_hidden_states, **kwargs)


@pytest.mark.parametrize("policy", ["fixed", "footprint"])
def test_instance_path_calls_the_layers_own_cross_attention_with_the_instance_captions(policy):
    unet = make_unet("sd15")
    adapter = make_adapter(unet, "sd15", grid_policy=policy)
    unet.set_attn_processor(_RecordingProcessor())
    data = make_instances(2, 3, _dim("sd15"), masks=[[1, 0, 1], [0, 1, 0]])
    _RecordingProcessor.calls.clear()
    with _Installed(adapter, unet):
        _run(unet, "sd15", data)  # latents 16 x 12
    valid = data["masks"].bool()
    captions = data["embeddings"][valid]  # [3, L, D], in (sample, slot) order
    boxes = data["boxes"][valid].double().tolist()
    for spec in adapter.specs:
        attn2 = unet.get_submodule(spec.name).attn2
        calls = [c for c in _RecordingProcessor.calls if c[0] is attn2]
        H, W = 16 * 8 // spec.downsample, 12 * 8 // spec.downsample  # the layer's map (VAE factor 8)
        if policy == "fixed":
            want = [(spec.grid, spec.grid)] * 3
        else:  # per axis: min(grid, ceil(the box's extent in feature pixels))
            want = [(min(spec.grid, math.ceil((y2 - y1) * H)), min(spec.grid, math.ceil((x2 - x1) * W)))
                    for x1, y1, x2, y2 in boxes]
        # the global call, then one batched call per grid size over its crops, each with its instances' captions
        assert len(calls) == 1 + len(set(want))
        seen = []
        for _, shape, text in calls[1:]:
            rows = [next(k for k in range(3) if torch.equal(t, captions[k])) for t in text]
            assert all(want[k] == want[rows[0]] for k in rows)
            ph, pw = want[rows[0]]
            assert shape == (len(rows), ph * pw, spec.dim)
            seen += rows
        assert sorted(seen) == [0, 1, 2]
