"""The toy Stable-Diffusion-format model of the synthetic world: configs, tokenizer and loading helpers.

Sizes are chosen for a 2-core CPU: 32x32 RGB images, a VAE with one 2x downsampling (latents 4 x 16 x 16), a
2-layer CLIP text model of width 64 over a tokenizer whose vocabulary is the world's words, and a UNet with
two cross-attention levels (16x16 and 8x8 latents). Saved as a diffusers folder (``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) that
``StableDiffusionPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import os

import torch

from .world import VOCAB

RESOLUTION = 32
VAE_SCALE_FACTOR = 2
TEXT_WIDTH = 64
MAX_TOKENS = 32  # the longest global caption (6 objects) is 23 words + 2 special tokens
# ROI grid side per downsampling factor (image pixels per feature pixel): the 16x16 and 8x8 latent maps.
GRID_SIZES = {2: 8, 4: 5}


def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, mid_block_add_attention=False,
    )


def unet_config(**overrides) -> dict:
    cfg = dict(
        sample_size=RESOLUTION // VAE_SCALE_FACTOR, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4, norm_num_groups=8,
    )
    cfg.update(overrides)
    return cfg


def scheduler_config() -> dict:
    # Stable Diffusion's training schedule.
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, prediction_type="epsilon")


def build_tokenizer(directory: str):
    """A ``CLIPTokenizer`` whose BPE merges make every word of the world one token; written to ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    os.makedirs(directory, exist_ok=True)
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
    )
    bpe.train_from_iterator(sorted(VOCAB) * 4, trainer)
    bpe.model.save(directory)  # vocab.json + merges.txt, the files CLIPTokenizer reads
    # The trainer numbers the end-of-word single characters ("a</w>", ...) in a different order from one
    # process to the next, and "a</w>" is the word "a": give those ids in sorted order, so the token ids (and
    # everything trained on them) do not depend on the process.
    with open(os.path.join(directory, "vocab.json")) as f:
        vocab = json.load(f)
    eow = sorted(t for t in vocab if t.endswith("</w>") and len(t) == len("</w>") + 1)
    for tok_, i in zip(eow, sorted(vocab[t] for t in eow)):
        vocab[tok_] = i
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(dict(sorted(vocab.items(), key=lambda kv: kv[1])), f, ensure_ascii=False, separators=(",", ":"))
    tok = CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"),
                        model_max_length=MAX_TOKENS)
    tok.save_pretrained(directory)
    for word in VOCAB:
        ids = tok(word).input_ids
        if len(ids) != 3:
            raise RuntimeError(f"tokenizer splits {word!r} into {tok.convert_ids_to_tokens(ids)}")
    return tok


def text_encoder_config(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def write_model_index(directory: str) -> None:
    """``model_index.json`` of a StableDiffusionPipeline folder (no safety checker, no feature extractor)."""
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(directory, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def gligen_unet_from_base(unet):
    """A diffusers GLIGEN UNet (``attention_type="gated"``: a gated self-attention ``fuser`` in every transformer
    block and a ``position_net``) holding ``unet``'s weights; only the GLIGEN parts are new. Returns (gligen
    unet, names of the new parameters)."""
    from diffusers import UNet2DConditionModel

    cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    cfg["attention_type"] = "gated"
    gligen = UNet2DConditionModel(**cfg)
    missing, unexpected = gligen.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not (".fuser." in k or k.startswith("position_net.")) for k in missing):
        raise RuntimeError(f"GLIGEN UNet does not extend the base UNet: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return gligen, set(missing)


@torch.no_grad()
def encode_text(text_encoder, tokenizer, texts: list[str], device="cpu"):
    """(token states [B, L, D], pooled [B, D]) as the pipelines compute them."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    out = text_encoder(ids)
    return out.last_hidden_state, out.pooler_output
