"""Tiny random-weight Stable Diffusion pipelines, built from configs.

No machine this project is tested on can reach a model hub, so the embedded
default model and the test fixtures are built here and written with
``save_pretrained`` in the standard diffusers layout. The server then loads
them through exactly the same ``from_pretrained`` code a real model uses.

The shapes are chosen for speed on a 2-core CPU while keeping the real
architecture's contract: 8x spatial downsampling in the VAE (four blocks,
three downsamples), 4 latent channels, a CLIP text encoder with a 77-token
window. The VAE has no mid-block attention: at 1024x1024 its latent is
128x128 = 16384 tokens and quadratic attention there would take minutes.
The weights are random, so the images are noise.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_KINDS = (
    "tiny-sd", "tiny-sdxl", "tiny-sd-inpaint", "tiny-sd3",
    "tiny-flux-dev", "tiny-flux-schnell", "tiny-flux-fill", "tiny-flux-kontext", "tiny-flux2-klein",
    "tiny-qwen-image", "tiny-qwen-image-edit", "tiny-qwen-image-edit-plus", "tiny-z-image",
)

_TOKENIZER_WINDOW = 77
_TEXT_HIDDEN = 32


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def write_byte_level_tokenizer(folder: Path) -> None:
    """Write a CLIP tokenizer whose vocabulary is every byte, with and
    without CLIP's end-of-word marker, plus a handful of merges of frequent
    English letter pairs so that token counts are not simply characters."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = []
    for pair in ("th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "st", "es"):
        a, b = pair
        merges.append(f"{a} {b}")
        vocab.setdefault(a + b, len(vocab))
        merges.append(f"{a} {b}</w>")
        vocab.setdefault(a + b + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")

    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=_TOKENIZER_WINDOW,
    )
    tokenizer.save_pretrained(str(folder))


def byte_level_clip_tokenizer(model_max_length: int = _TOKENIZER_WINDOW):
    """The tokenizer :func:`write_byte_level_tokenizer` writes, loaded."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_byte_level_tokenizer(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length)


def _text_encoder_config(vocab_size: int, projection_dim: int = _TEXT_HIDDEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_TOKENIZER_WINDOW,
        projection_dim=projection_dim,
        # CLIP's pooled output is taken at the end-of-text token; point the
        # config at the id our vocabulary gives it.
        eos_token_id=vocab_size - 1,
        bos_token_id=vocab_size - 2,
        pad_token_id=vocab_size - 1,
    )


def _vae(latent_channels: int = 4, **config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        mid_block_add_attention=False,
        **config,
    )


def _unet(sdxl: bool, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=64,
        # 9 for an inpainting UNet: latents, the mask and the masked image's latents, concatenated.
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    if not sdxl:
        return UNet2DConditionModel(cross_attention_dim=_TEXT_HIDDEN, **common)
    # SDXL conditions on both encoders' hidden states concatenated, plus the
    # pooled embedding of the second encoder and six size/crop numbers.
    addition_time_embed_dim = 8
    return UNet2DConditionModel(
        cross_attention_dim=2 * _TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + _TEXT_HIDDEN,
        **common,
    )


def _scheduler(sdxl: bool):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="trailing" if sdxl else "leading",
        steps_offset=1,
    )


def build_tiny_pipeline(kind: str = "tiny-sd", seed: int = 0):
    """Build a tiny random pipeline object of the given kind in memory."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {TINY_KINDS}")
    if kind == "tiny-flux2-klein":
        return build_tiny_flux2_klein(seed)
    if kind.startswith("tiny-flux"):
        return _tiny_flux(kind, seed=seed)
    if kind == "tiny-sd3":
        return build_tiny_sd3(seed)
    if kind.startswith("tiny-qwen-image"):
        return build_tiny_qwen_image(kind, seed)
    if kind == "tiny-z-image":
        return build_tiny_z_image(seed)
    sdxl = kind == "tiny-sdxl"
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_byte_level_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    vocab_size = len(tokenizer)
    text_encoder = CLIPTextModel(_text_encoder_config(vocab_size))
    if not sdxl:
        inpaint = kind == "tiny-sd-inpaint"
        pipeline_class = StableDiffusionInpaintPipeline if inpaint else StableDiffusionPipeline
        return pipeline_class(
            vae=_vae(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=_unet(sdxl=False, in_channels=9 if inpaint else 4),
            scheduler=_scheduler(sdxl=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=CLIPTextModelWithProjection(_text_encoder_config(vocab_size)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=_unet(sdxl=True),
        scheduler=_scheduler(sdxl=True),
    )


# --- FLUX.1 -------------------------------------------------------------------

# T5's window in the tiny model: short, because FLUX pads every prompt to the
# full window and the transformer attends over all of it (512 in the real one).
_T5_WINDOW = 64


def t5_unigram_tokenizer(model_max_length: int = _T5_WINDOW):
    """A T5 (SentencePiece Unigram) tokenizer built from an in-memory
    vocabulary, as transformers 5.x allows: every ASCII letter, digit and
    common punctuation mark, alone and word-initial ("▁"), plus a few whole
    words that score higher, so a word costs one token or one per character."""
    import string

    from transformers import T5TokenizerFast

    # T5's fixed ids: pad 0, end-of-sequence 1, unknown 2.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    for ch in string.ascii_letters + string.digits + ".,;:!?'\"-()":
        vocab += [(ch, -5.0), ("▁" + ch, -5.5)]
    for word in ("the", "a", "of", "and", "in", "on", "cat", "dog", "red", "blue", "photo", "sea", "otter"):
        vocab.append(("▁" + word, -3.0))
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _t5_encoder(vocab_size: int, d_model: int, d_kv: int, num_heads: int):
    """A two-layer T5 v1.1 encoder (gated-GELU, as SD3's and FLUX's T5-XXL) at toy width,
    with T5's fixed ids (pad 0, end-of-sequence 1)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=d_kv,
            d_ff=64,
            num_layers=2,
            num_heads=num_heads,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _flux_vae():
    """FLUX's VAE shape at toy width: 8x downsampling (four blocks) as
    SD's, but 16 latent channels, no quant convs, and FLUX's latent scaling
    and shift."""
    return _vae(
        latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    )


def _tiny_flux(kind: str, seed: int):
    """FLUX.1 [dev] (guidance-distilled: a guidance embedding, shift 3 scaled
    by the image's token count) or [schnell] (no guidance input, a fixed
    schedule: shift 1, no dynamic shifting), with the real schedulers' configs.
    The edit models are [dev]'s shape: Fill's transformer also reads the
    masked image's packed latents (64 channels) and the packed pixel mask
    (each latent cell's 8x8 pixels in 2x2 patches: 256 channels), 384 in all
    as in the real FLUX.1-Fill-dev; Kontext's is [dev]'s, the input image's
    tokens going beside the generated ones."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxFillPipeline,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    dev = kind != "tiny-flux-schnell"
    packed = 16 * 4  # 16 latent channels packed in 2x2 patches
    in_channels = packed + packed + 8 * 8 * 4 if kind == "tiny-flux-fill" else packed
    pipeline_class = {"tiny-flux-fill": FluxFillPipeline, "tiny-flux-kontext": FluxKontextPipeline}.get(kind, FluxPipeline)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_byte_level_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    tokenizer_2 = t5_unigram_tokenizer()
    t5_dim = 32
    text_encoder_2 = _t5_encoder(len(tokenizer_2), d_model=t5_dim, d_kv=8, num_heads=4)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=packed,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_dim,
        pooled_projection_dim=_TEXT_HIDDEN,  # CLIP's pooled output
        guidance_embeds=dev,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0 if dev else 1.0,
        use_dynamic_shifting=dev,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return pipeline_class(
        scheduler=scheduler,
        vae=_flux_vae(),
        text_encoder=CLIPTextModel(_text_encoder_config(len(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


# --- FLUX.2 [klein] ------------------------------------------------------------

# Qwen3's chat template, cut to what Flux2KleinPipeline renders: one user
# message, the assistant's turn opened, thinking switched off (an empty
# think block), as Qwen3's own template renders it with enable_thinking=False.
_QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# Klein's text window in the tiny model (512 in the real one): every prompt is
# padded to it and the transformer attends over all of it.
_QWEN3_WINDOW = 64


def qwen3_tokenizer(model_max_length: int = _QWEN3_WINDOW):
    """A Qwen2 byte-level BPE tokenizer (Qwen3's kind) built from an in-memory
    vocabulary, as transformers 5.x allows: every byte, a few merges of
    frequent English pairs, and the special tokens Qwen3's chat template uses."""
    from transformers import Qwen2Tokenizer

    vocab = {symbol: i for i, symbol in enumerate(_bytes_to_unicode().values())}
    merges = []
    for a, b in ("th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "st", "es", ("Ġ", "c"), ("Ġ", "a")):
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    chat_tokens = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    for token in ["<|endoftext|>", *chat_tokens]:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        chat_template=_QWEN3_CHAT_TEMPLATE,
        additional_special_tokens=chat_tokens,
    )


def build_tiny_flux2_klein(seed: int = 0):
    """A tiny Flux2KleinPipeline: a Qwen3 causal LM whose hidden states after
    layers 9, 18 and 27 are the text conditioning (28 layers, so that the
    pipeline's default layers exist), a FLUX.2 transformer, and FLUX.2's VAE
    (32 latent channels patchified 2x2 to 128, downsampling 8x) with
    non-trivial batch-norm statistics, so that decoding must apply them.
    Not distilled (``is_distilled`` false): it runs classifier-free guidance,
    as [klein]'s base checkpoints do; the distilled ones skip it."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = qwen3_tokenizer()
    hidden = 16
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=32,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
    )
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
        mid_block_add_attention=False,
    )
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.5)
        vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) * 2 + 0.25)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=32 * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * hidden,  # three hidden layers side by side
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),  # sums to attention_head_dim
        guidance_embeds=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, is_distilled=False
    )


# --- Stable Diffusion 3 / 3.5 ------------------------------------------------
# Widths chosen so that every concatenation SD3 does is visible: the two CLIP
# encoders' hidden states side by side (32 + 32) are zero-padded up to T5's
# width (96), as SD3's 768 + 1280 are padded to 4096; pooled 32 + 32 = 64.
_SD3_T5_HIDDEN = 96


def build_tiny_sd3(seed: int = 0):
    """A tiny StableDiffusion3Pipeline: CLIP-L, CLIP-G and T5 encoders, an
    MMDiT with SD3.5's extras (RMS q/k norm, one dual-attention layer), a
    16-channel VAE that downsamples 8x, and SD3's shifted flow-matching
    Euler scheduler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_byte_level_tokenizer(Path(tmp) / "clip")
        clip_tokenizer = CLIPTokenizer.from_pretrained(str(Path(tmp) / "clip"))
    t5_tokenizer = t5_unigram_tokenizer(model_max_length=512)
    vocab_size = len(clip_tokenizer)
    t5 = _t5_encoder(len(t5_tokenizer), d_model=_SD3_T5_HIDDEN, d_kv=16, num_heads=2)
    transformer = SD3Transformer2DModel(
        sample_size=64,  # default 512x512
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=_SD3_T5_HIDDEN,
        caption_projection_dim=32,
        pooled_projection_dim=2 * _TEXT_HIDDEN,
        # Position embeddings for up to 128x128 patches: images to 2048 px a
        # side (the service's largest is 1792), as SD3's 192 reach 3072.
        pos_embed_max_size=128,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = _vae(
        latent_channels=16,
        # SD3's VAE: no quant convs, and latents shifted as well as scaled.
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(_text_encoder_config(vocab_size)),
        tokenizer=clip_tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_encoder_config(vocab_size)),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )


# --- Qwen-Image, Qwen-Image-Edit and Edit-Plus --------------------------------
# Qwen2.5-VL's special tokens that the pipelines' prompt templates use: the
# chat turns, and the vision markers an edit's image is spliced in with.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
_QWEN_HIDDEN = 32


def qwen2_byte_level_tokenizer(special_tokens: tuple[str, ...] = QWEN_SPECIAL_TOKENS, **kwargs):
    """A Qwen2 tokenizer (byte-level BPE) built from an in-memory vocabulary,
    as transformers 5.x allows: every byte, a few merges of frequent English
    letter pairs, and the model's special tokens as single tokens (Qwen2.5-VL's
    by default; ``special_tokens[0]`` is "<|endoftext|>", the pad token).
    ``kwargs`` go to the tokenizer (a chat template, the end-of-turn token)."""
    from transformers import Qwen2Tokenizer

    vocab = {s: i for i, s in enumerate(_bytes_to_unicode().values())}
    merges = []
    for a, b in ("th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "st", "es"):
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    for token in special_tokens:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab, merges=merges, additional_special_tokens=list(special_tokens[1:]), model_max_length=32768, **kwargs
    )


def _qwen2_5_vl_encoder(tokenizer):
    """Qwen2.5-VL at toy width: a two-layer language model (multimodal RoPE
    sections summing to half its head size) and a two-block vision tower whose
    output width is the language model's, with the special-token ids of our
    tokenizer."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=_QWEN_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=_QWEN_HIDDEN,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _qwen_image_vae():
    """Qwen-Image's 3-D causal VAE at toy width with the real one's contract:
    8x spatial downsampling (three downsamples), 16 latent channels, and
    per-channel latent mean and std (the real model's values)."""
    from diffusers import AutoencoderKLQwenImage

    # base_dim 4: the edit pipelines encode every input at about a megapixel,
    # and 3-D convolutions there cost seconds on a CPU even at this width.
    return AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=list(QWEN_IMAGE_LATENTS_MEAN),
        latents_std=list(QWEN_IMAGE_LATENTS_STD),
    )


# Qwen-Image's VAE's published per-channel latent statistics.
QWEN_IMAGE_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
QWEN_IMAGE_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


def build_tiny_qwen_image(kind: str = "tiny-qwen-image", seed: int = 0):
    """A tiny QwenImagePipeline, QwenImageEditPipeline or
    QwenImageEditPlusPipeline: Qwen2.5-VL text encoder, the MMDiT (2x2
    packed 16-channel latents), the 3-D VAE, and the real scheduler config
    (dynamic shifting by image token count, exponential time shift)."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(seed)
    tokenizer = qwen2_byte_level_tokenizer()
    text_encoder = _qwen2_5_vl_encoder(tokenizer)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16 * 4,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_QWEN_HIDDEN,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        # Edit-Plus (2509): reference tokens get their own zero-timestep conditioning.
        zero_cond_t=kind == "tiny-qwen-image-edit-plus",
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        time_shift_type="exponential",
        invert_sigmas=False,
        shift_terminal=0.02,
    )
    components = dict(scheduler=scheduler, vae=_qwen_image_vae(), text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    if kind == "tiny-qwen-image":
        return QwenImagePipeline(**components)
    # The edit pipelines' processor (Qwen2VLProcessor) needs torchvision; the
    # tiny model is written without it and the architecture drives the
    # tokenizer and the slow image processor itself (serve_app.pipeline.architectures.qwen_image).
    edit_class = QwenImageEditPlusPipeline if kind == "tiny-qwen-image-edit-plus" else QwenImageEditPipeline
    return edit_class(processor=None, **components)


# --- Z-Image -------------------------------------------------------------------
# Qwen3's chat turns and thinking markers, as single tokens.
QWEN3_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's ChatML format, reduced to what ZImagePipeline asks of it (one user
# turn, the assistant's turn opened, thinking on): the real template also
# renders system prompts, tools and past reasoning, none of which a prompt
# reaches. With thinking off Qwen3 writes an empty thinking block.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
_Z_IMAGE_TEXT_HIDDEN = 32


def _qwen3_encoder(tokenizer):
    """Qwen3 at toy width: three layers (Z-Image reads the second-to-last
    hidden states, so they differ from both the embeddings and the output),
    grouped-query attention as Qwen3-4B's (2 query heads per key/value head)."""
    from transformers import Qwen3Config, Qwen3Model

    ids = tokenizer.convert_tokens_to_ids
    return Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=_Z_IMAGE_TEXT_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=2048,
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        )
    )


def build_tiny_z_image(seed: int = 0):
    """A tiny ZImagePipeline: a Qwen3 text encoder with Qwen3's chat template,
    the single-stream DiT (2x2 patches of 16-channel latents, a noise and a
    context refiner, 3-axis RoPE), FLUX's VAE shape (8x, 16 channels, scale
    and shift), and Z-Image-Turbo's scheduler config (static shift 3)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = qwen2_byte_level_tokenizer(QWEN3_SPECIAL_TOKENS, chat_template=QWEN3_CHAT_TEMPLATE, eos_token="<|im_end|>")
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=_Z_IMAGE_TEXT_HIDDEN,
        axes_dims=[4, 6, 6],  # sums to the head size, 32 / 2
        # The real model's RoPE table lengths: caption positions up to 1536,
        # up to 512 patches a side.
        axes_lens=[1536, 512, 512],
    )
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=_flux_vae(),
        text_encoder=_qwen3_encoder(tokenizer),
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _save_qwen2_vl_processor(root: Path, tokenizer) -> None:
    """The edit pipelines' processor/ folder as a real checkpoint has it (the
    image processor's config and the tokenizer), listed in model_index.json as
    ``Qwen2VLProcessor``. Written part by part: transformers' processor
    object will not build without torchvision (see qwen2_vl_processor)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil().save_pretrained(str(root / "processor"))
    tokenizer.save_pretrained(str(root / "processor"))
    index_path = root / "model_index.json"
    index = json.loads(index_path.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_tiny_pipeline(target: str | os.PathLike, kind: str = "tiny-sd", seed: int = 0) -> Path:
    """Build a tiny pipeline and write it to ``target`` in diffusers layout.

    Writes into a sibling temporary folder and renames it into place, so a
    reader never sees a half-written model (several replicas may race to
    build the embedded default on first start).
    """
    target = Path(target)
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline(kind, seed)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if kind.startswith("tiny-qwen-image-edit"):
            _save_qwen2_vl_processor(tmp, pipe.tokenizer)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (target / "model_index.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
