"""The embedded model's untrained components: configs and its tokenizer.

scripts/train_embedded_model.py trains these on the scenes of
``serve_app.pipeline.scenes`` and saves them in the standard Stable
Diffusion layout; the server loads the result like any checkpoint.

The shapes are sized for the speed target on a 2-core CPU (a 512x512 image
in 1.5 s): the VAE is narrow at full resolution, where a decode spends its
time, and has no attention; the UNet has four levels so that its bottom
level (1/64 of the image) sees the whole frame, which is how it knows where
"top left" is, and cross-attends to the caption only at the two lowest.
"""

from __future__ import annotations

import json
from pathlib import Path

from serve_app.pipeline.scenes import caption_words
from serve_app.pipeline.tiny import _bytes_to_unicode

TOKENIZER_WINDOW = 77
TEXT_HIDDEN = 64


def write_caption_tokenizer(folder: Path) -> None:
    """Write a CLIP tokenizer in which every caption word is one token.

    Its merges are learnt by a BPE trainer over the caption words, so they
    build each word whole; every byte (with and without CLIP's end-of-word
    marker) is in the vocabulary too, so any other word still tokenizes, as
    characters and whatever merges apply.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, show_progress=False, initial_alphabet=symbols, end_of_word_suffix="</w>"
    )
    bpe.train_from_iterator(caption_words(), trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]]
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]:
        vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=TOKENIZER_WINDOW
    )
    tokenizer.save_pretrained(str(folder))


def text_encoder(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=2 * TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TOKENIZER_WINDOW,
            projection_dim=TEXT_HIDDEN,
            # CLIP's pooled output is taken at the end-of-text token.
            eos_token_id=vocab_size - 1,
            bos_token_id=vocab_size - 2,
            pad_token_id=vocab_size - 1,
        )
    )


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        # One group: a group norm removes each group's mean and scale over the
        # image, and these images are mostly one flat colour, which with few
        # channels per group would normalise to the same features whatever
        # the colour. Over all channels only the pattern across them is kept,
        # which still tells the colours apart.
        norm_num_groups=1,
        sample_size=256,
        mid_block_add_attention=False,
    )


def unet():
    """The UNet. The caption reaches it two ways: cross-attention at the two
    lowest levels, where each latent pixel looks up the words that concern
    it, and pooled (by attention) into the timestep embedding, which scales
    and shifts every ResNet block's normalised features (FiLM) rather than
    being added before a group norm that takes most of a uniform offset out
    again. Trained on the pure-noise step alone (caption to picture), a UNet
    without the pooled path had not learnt the background colour after
    1,400 steps; one with it (and a third cross-attention level, at half the
    learning rate) had it after about 300 (README, "The embedded model")."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64, 96),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=16,
        norm_num_groups=8,
        cross_attention_dim=TEXT_HIDDEN,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
        resnet_time_scale_shift="scale_shift",
    )


def scheduler():
    from diffusers import EulerDiscreteScheduler

    # Zero terminal SNR with v-prediction (Lin et al., "Common Diffusion Noise
    # Schedules and Sample Steps are Flawed"): SD's own schedule leaves 7% of
    # the image in its noisiest training step, and in a scene that is mostly
    # one flat colour that leak is the background's colour, so a model trained
    # on it takes the colour from the noise rather than from the caption, and
    # at sampling time, which starts from pure noise, draws a random one.
    # Trailing spacing starts the sampler at that last step.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
    )
