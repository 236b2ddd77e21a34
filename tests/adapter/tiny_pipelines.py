"""Tiny random-weight diffusers pipelines built from configs (no download), shared by the pipeline/CLI tests and
any other test that needs a whole text-to-image pipeline.

Every builder is deterministic (seeded). Images are 64x64 (latents 8x8, VAE factor 8); the UNets have two
levels (feature maps 8x8 and 4x4). The tokenizer is a real ``CLIPTokenizer`` over a byte-level vocabulary
written to a local folder (every byte with and without the end-of-word marker, no merges), so any text
tokenizes, one token per character.

    pipe = make_sd_pipeline(tmp_path)                      # StableDiffusionPipeline
    pipe = make_sdxl_pipeline(tmp_path)                    # StableDiffusionXLPipeline, two text encoders
    pipe = make_controlnet_pipeline(tmp_path)              # StableDiffusionControlNetPipeline
    pipe = make_t2i_adapter_pipeline(tmp_path)             # StableDiffusionAdapterPipeline
    add_ip_adapter(pipe)                                   # tiny image encoder + IP-Adapter weights made here
    adapter = make_pipeline_adapter(pipe)                  # ROICtrlAdapter with random non-zero weights
    save_sd_model(directory)                               # a diffusers folder on disk (what the CLI loads)
"""

from __future__ import annotations

import json
import os

import torch

from roictrl_testutils import SD15

IMAGE_SIZE = 64
TEXT_LEN = 32  # tokenizer.model_max_length: the prompt embeddings are [B, 32, D] (one token per character)
SD_UNET = {**SD15, "sample_size": IMAGE_SIZE // 8}  # the adapter tests' SD1.5-like UNet, for 64 px images
SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32, attention_head_dim=(4, 8), transformer_layers_per_block=(1, 2),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8,
)
#: Small ROI grids keep the tests fast (the adapter's defaults are tested elsewhere).
GRIDS = {8: 5, 16: 3}


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 / CLIP)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer(directory: str | os.PathLike) -> str:
    """Write ``vocab.json`` and ``merges.txt`` of a byte-level CLIP vocabulary; returns ``directory``."""
    os.makedirs(directory, exist_ok=True)
    chars = sorted(set(_bytes_to_unicode().values()))
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return os.fspath(directory)


VOCAB_SIZE = 2 * 256 + 2


def make_tokenizer(directory: str | os.PathLike):
    from transformers import CLIPTokenizer

    d = write_tokenizer(directory)
    return CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"), model_max_length=TEXT_LEN)


def make_text_encoder(hidden: int = 32, seed: int = 0, projection_dim: int | None = None):
    """``CLIPTextModel`` (or ``CLIPTextModelWithProjection`` with ``projection_dim``) with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TEXT_LEN, projection_dim=projection_dim or hidden,
        bos_token_id=VOCAB_SIZE - 2, eos_token_id=VOCAB_SIZE - 1, pad_token_id=VOCAB_SIZE - 1,
    )
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection_dim else CLIPTextModel)(config)
    return model.eval()


def make_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4, sample_size=IMAGE_SIZE,
    ).eval()


def make_unet(config: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _sd_parts(directory) -> dict:
    return dict(
        vae=make_vae(), text_encoder=make_text_encoder(), tokenizer=make_tokenizer(os.path.join(directory, "tok")),
        unet=make_unet(SD_UNET), scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
    )


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sd_pipeline(directory):
    from diffusers import StableDiffusionPipeline

    return _quiet(StableDiffusionPipeline(**_sd_parts(directory), requires_safety_checker=False))


def make_sdxl_pipeline(directory):
    from diffusers import StableDiffusionXLPipeline

    tok = make_tokenizer(os.path.join(directory, "tok"))
    return _quiet(StableDiffusionXLPipeline(
        vae=make_vae(), text_encoder=make_text_encoder(16, seed=0), text_encoder_2=make_text_encoder(16, 1, 16),
        tokenizer=tok, tokenizer_2=tok, unet=make_unet(SDXL_UNET), scheduler=make_scheduler(),
    ))


def make_controlnet(unet, seed: int = 5):
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    with torch.no_grad():  # from_unet zero-initialises the residual convs: make them matter
        for p in controlnet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return controlnet.eval()


def make_controlnet_pipeline(directory):
    from diffusers import StableDiffusionControlNetPipeline

    parts = _sd_parts(directory)
    return _quiet(StableDiffusionControlNetPipeline(
        **parts, controlnet=make_controlnet(parts["unet"]), requires_safety_checker=False
    ))


def make_t2i_adapter_pipeline(directory):
    from diffusers import StableDiffusionAdapterPipeline, T2IAdapter

    torch.manual_seed(6)
    t2i = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=8,
                     adapter_type="full_adapter").eval()
    return _quiet(StableDiffusionAdapterPipeline(**_sd_parts(directory), adapter=t2i, requires_safety_checker=False))


def control_image(seed: int = 7):
    """A 64x64 RGB PIL image (a condition for ControlNet / T2I-Adapter)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(IMAGE_SIZE, IMAGE_SIZE, 3, generator=g) * 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


def add_ip_adapter(pipe, image_embed_dim: int = 16, seed: int = 8):
    """Load an IP-Adapter (random weights, made here as a state dict) into ``pipe`` plus a tiny CLIP image
    encoder and image processor, so ``pipe(..., ip_adapter_image=PIL image)`` runs the whole IP-Adapter path."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = pipe.unet
    D = unet.config.cross_attention_dim
    tokens = 4  # diffusers reads a plain IP-Adapter's projection as 4 image tokens
    image_proj = {
        "proj.weight": torch.randn(tokens * D, image_embed_dim) * 0.1, "proj.bias": torch.zeros(tokens * D),
        "norm.weight": torch.ones(D), "norm.bias": torch.zeros(D),
    }
    ip_layers, key = {}, 1
    for name in unet.attn_processors:  # diffusers numbers the cross-attention processors 1, 3, 5, ...
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.rsplit(".processor", 1)[0]).inner_dim
        ip_layers[f"{key}.to_k_ip.weight"] = torch.randn(hidden, D) * 0.1
        ip_layers[f"{key}.to_v_ip.weight"] = torch.randn(hidden, D) * 0.1
        key += 2
    pipe.load_ip_adapter({"image_proj": image_proj, "ip_adapter": ip_layers}, subfolder="", weight_name="",
                         image_encoder_folder=None)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=image_embed_dim)
    pipe.register_modules(
        image_encoder=CLIPVisionModelWithProjection(vision).eval(),
        feature_extractor=CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}),
    )
    pipe.set_ip_adapter_scale(1.0)
    return pipe


def make_pipeline_adapter(pipe, seed: int = 1, randomize: bool = True, **options):
    """A ROICtrlAdapter for ``pipe.unet`` with small grids and, by default, random non-zero weights (gates and
    blend projection included), so that it visibly changes the output; ``options``: from_unet's (preset, ...)."""
    from roi_ops.roictrl_adapter import ROICtrlAdapter
    from roictrl_testutils import randomize_

    torch.manual_seed(seed)
    adapter = ROICtrlAdapter.from_unet(pipe.unet, grid_sizes=GRIDS,
                                       **{"position_dim": 16, "position_hidden_dim": 16, **options})
    return randomize_(adapter, seed) if randomize else adapter


def save_sd_model(directory) -> str:
    """A tiny SD1.5-style diffusers folder (what ``StableDiffusionPipeline.from_pretrained`` reads)."""
    pipe = make_sd_pipeline(os.path.join(os.fspath(directory), ".build"))
    pipe.save_pretrained(directory, safe_serialization=True)
    return os.fspath(directory)


def save_cli_files(root, layout: dict, adapter_dir: str = "roictrl-adapter"):
    """What ``roi-ops generate`` reads, under ``root``: ``sd15/`` (a tiny SD folder), ``<adapter_dir>/`` (a saved
    adapter for it) and ``layout.json`` (``layout``). Returns ``root``."""
    from diffusers import StableDiffusionPipeline

    save_sd_model(os.path.join(root, "sd15"))
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(root, "sd15"), local_files_only=True)
    make_pipeline_adapter(pipe).save_pretrained(os.path.join(root, adapter_dir))
    with open(os.path.join(root, "layout.json"), "w") as f:
        json.dump(layout, f)
    return root
