"""Train the embedded text-to-image model on generated flat-shape scenes.

    python scripts/train_embedded_model.py --out /tmp/m          # VAE then UNet: the committed recipe, 113 minutes
    python scripts/train_embedded_model.py --stage vae --vae-minutes 12 --out /tmp/m
    python scripts/train_embedded_model.py --stage unet --unet-minutes 40 --out /tmp/m   # reuses /tmp/m/vae

Three stages, each with a wall-clock budget (or a step count):
1. the VAE, on whole scenes of 64 and 128 pixels (it is fully convolutional),
   with the shapes' pixels weighed up, until flat colours, edges and the
   shapes' colours survive encode -> decode (it logs its reconstructions
   scored as the evaluation scores pictures: the ceiling for any UNet on
   it); its latent scaling factor is then measured so that scaled latents
   have unit variance, as SD's 0.18215 does;
2. the text encoder and UNet together on captioned scenes at 256 and 512
   pixels (``--unet-sizes``), with 10% of captions dropped for
   classifier-free guidance and a quarter of each batch at the pure-noise
   step the sampler starts from, the VAE's encoder giving the latents, and
   linear read-outs of each scene's background, shape colour, kind and
   position from the pooled caption (``--caption-attribute-weight``);
3. optionally (``--decoder-minutes``, 0 by default), the VAE's decoder alone,
   on scenes up to 512 pixels: the encoder is frozen, so the latent space
   the UNet learnt does not move. It needs nothing from stage 2, so
   ``--stage decoder --decoder-out DIR`` can run beside it.
The result is written in the standard Stable Diffusion diffusers layout
(safetensors) with an Euler scheduler, and loads with
``StableDiffusionPipeline.from_pretrained``.

Seeded: the scenes, captions and initial weights come from ``--seed``. With a
``--*-steps`` count a run is repeatable step for step (bar thread-level float
non-determinism); with a ``--*-minutes`` budget the number of steps depends
on the machine's speed, and the learning rate follows the elapsed fraction.

The committed model (models/embedded-sd) was made with these defaults on
this project's 2-core CPU, in two runs: ``--stage vae`` (28 minutes) then
``--stage unet --checkpoint-steps 1000`` (85 minutes); README, "The
embedded model", has the step counts and scores.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve_app.pipeline import embedded  # noqa: E402
from serve_app.pipeline.scenes import COLOURS, POSITIONS, SHAPES, Scene, caption, random_scene, render, render_mask, score, to_array  # noqa: E402

CAPTION_DROPOUT = 0.1
# (resolution, batch size, share of steps) for the UNet stage, by --unet-sizes.
UNET_RESOLUTIONS = {
    # The model committed before 2026-12-02 was trained on this mix: mostly
    # small images for speed, some 512s so that it saw the latent sizes it serves.
    "128-512": ((128, 24, 0.4), (256, 8, 0.5), (512, 2, 0.1)),
    # The committed model's: only the two sizes the evaluation asks for.
    # The reasoning, not tested on its own: the UNet's only sense of where "top left" is comes from
    # its convolutions' zero padding, which counts latent pixels from the
    # edge, not fractions of the frame, so a 128 image teaches other
    # distances than the 256 and 512 it serves.
    "256-512": ((256, 8, 0.7), (512, 2, 0.3)),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images -> a float batch in [-1, 1], as the VAE expects."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def scene_pixels(scenes: list[Scene], resolution: int) -> torch.Tensor:
    """The scenes drawn as one batch for the VAE, (N, 3, H, W) in [-1, 1]."""
    return to_tensor([to_array(render(scene, resolution)) for scene in scenes])


def shape_masks(scenes: list[Scene], resolution: int) -> torch.Tensor:
    """Where the scenes' shapes are, (N, 1, H, W): 1 on a shape, 0 on the background."""
    return torch.from_numpy(np.stack([np.asarray(render_mask(scene, resolution)) for scene in scenes])).float()[:, None] / 255


class Budget:
    """Stop after ``steps`` steps, or ``minutes`` of wall time; ``fraction`` drives the learning rate."""

    def __init__(self, minutes: float | None, steps: int | None):
        self.minutes, self.steps, self.start, self.done = minutes, steps, time.monotonic(), 0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def fraction(self) -> float:
        if self.steps:
            return self.done / self.steps
        return self.elapsed / (60 * self.minutes)

    def running(self) -> bool:
        return self.fraction < 1.0


def learning_rate(peak: float, fraction: float, warmup: float = 0.03) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if fraction < warmup:
        return peak * fraction / warmup
    progress = min(1.0, (fraction - warmup) / (1 - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def palette(resolution: int) -> torch.Tensor:
    """Each named colour as a whole image, one batch."""
    return scene_pixels([Scene(name, ()) for name in COLOURS], resolution)


def reconstruct(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels through encode (the latent's mean) -> decode, in eval mode
    and without gradients, leaving the VAE's train mode as it was."""
    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        out = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    vae.train(was_training)
    return out


def colour_errors(vae, resolution: int = 128) -> dict[str, float]:
    """Each named colour as a whole background, through encode -> decode:
    the mean error of its middle, in levels. A VAE that maps two colours to
    one latent (a flat image keeps only the pattern across channels through
    its group norms) shows here as a large error for one of them."""
    pixels = palette(resolution)
    out = reconstruct(vae, pixels)
    q = resolution // 4
    return {name: float((out[i] - pixels[i])[..., q:-q, q:-q].abs().mean() * 127.5) for i, name in enumerate(COLOURS)}


def reconstruction_scores(vae, resolution: int = 256, count: int = 24) -> dict[str, float]:
    """Fixed single-shape scenes through encode -> decode, measured as the
    evaluation measures the model's pictures: the ceiling any UNet on this
    VAE can reach. The mean pixel error hides a shape that comes back in
    the wrong colour (it is a few percent of the pixels); the VAE trained
    without ``--vae-shape-weight`` returned a red square on white as teal,
    and its reconstructions scored shape colour 54%, shape 54%, position 58%."""
    scenes = [random_scene(random.Random(f"reconstruction {i}"), two_shapes=0.0) for i in range(count)]
    out = reconstruct(vae, scene_pixels(scenes, resolution))
    images = ((out + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    scores = [score(image, scene) for image, scene in zip(images, scenes)]
    return {field: 100 * float(np.mean([getattr(s, field) for s in scores])) for field in ("background", "colour", "shape", "position")}


def locality_loss(vae, rng: random.Random, count: int = 4, resolution: int = 128) -> torch.Tensor:
    """How much a latent pixel depends on what lies away from it.

    The VAE's group norms normalise each feature map over the whole image,
    so without this term a colour's latent depends on the rest of the scene:
    with the committed VAE a large red square's centre encodes as
    (-1.36, -1.68, 0.76, 0.81) on green and (0.37, -0.27, -0.28, 0.42) on
    white. The UNet must then learn every (shape colour, background) pair
    separately rather than one code per colour; a UNet trained on it learnt
    the background asked for but not the shape's colour. Here each scene is
    encoded beside two others: the same shapes on another background (the
    shapes' insides must encode the same), and the same background with the
    shapes moved or changed (the background away from both must encode the
    same). The mean absolute difference there, in latent units."""
    scenes, recoloured, reshaped = [], [], []
    for _ in range(count):
        scene = random_scene(rng)
        used = {shape.colour for shape in scene.shapes} | {scene.background}
        scenes.append(scene)
        recoloured.append(Scene(rng.choice([c for c in COLOURS if c not in used]), scene.shapes))
        other = random_scene(rng)
        reshaped.append(Scene(scene.background, tuple(s for s in other.shapes if s.colour != scene.background) or scene.shapes))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def latents(batch):
        return vae.encode(scene_pixels(batch, resolution)).latent_dist.mean

    base, masks = latents(scenes), shape_masks(scenes, resolution)
    inside = -F.max_pool2d(-masks, factor)  # latent pixels wholly inside a shape
    # Background at least one latent pixel away from every shape in either scene.
    near = F.max_pool2d(torch.maximum(masks, shape_masks(reshaped, resolution)), factor)
    away = 1 - F.max_pool2d(near, 3, stride=1, padding=1)
    shapes = ((base - latents(recoloured)).abs() * inside).sum() / (inside.sum() * base.shape[1]).clamp(min=1)
    backgrounds = ((base - latents(reshaped)).abs() * away).sum() / (away.sum() * base.shape[1]).clamp(min=1)
    return shapes + backgrounds


def log_vae_quality(vae) -> None:
    log("vae colour errors (levels): " + " ".join(f"{k} {v:.0f}" for k, v in colour_errors(vae).items()))
    log("vae reconstructions scored (%): " + " ".join(f"{k} {v:.0f}" for k, v in reconstruction_scores(vae).items()))


def train_vae(args, rng: random.Random) -> "AutoencoderKL":  # noqa: F821
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae_init) if args.vae_init else embedded.vae()
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    budget = Budget(args.vae_minutes, args.vae_steps)
    while budget.running():
        # Whole scenes, not crops: the VAE's group norms see a whole image's
        # statistics when it serves, and a crop of plain background would
        # normalise to nothing whatever its colour.
        resolution = rng.choice((64, 128))
        batch = args.vae_batch * (128 // resolution) ** 2 // 2
        scenes = [random_scene(rng, two_shapes=0.3) for _ in range(batch)]
        pixels = scene_pixels(scenes, resolution)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # L1 keeps flat colours exact and edges sharp; the KL term only keeps the latents bounded.
        error = (reconstruction - pixels).abs()
        if args.vae_shape_weight:
            # The shapes are a few percent of the pixels: weigh them up, or
            # their colour is what the VAE gives up first (reconstruction_scores).
            weight = 1 + args.vae_shape_weight * shape_masks(scenes, resolution)
            error = error * weight / weight.mean()
        loss = error.mean() + 1e-6 * posterior.kl().mean()
        if args.vae_palette_weight:
            # Every named colour as a whole background, each step. The encoder's
            # last group norm removes the mean and scale of its features over
            # the image; a VAE trained on scenes alone was found with green,
            # blue, purple and black backgrounds whose features differed only
            # in scale there (distances 7-21 before the norm, 0.05-0.11 after),
            # so they shared one latent and decoded alike. This term gives
            # that collapse a gradient of its own.
            flats = palette(128)
            flat_posterior = vae.encode(flats).latent_dist
            loss = loss + args.vae_palette_weight * F.l1_loss(vae.decode(flat_posterior.sample()).sample, flats)
        if args.vae_locality_weight:
            locality = locality_loss(vae, rng)
            loss = loss + args.vae_locality_weight * locality
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.vae_lr, budget.fraction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        budget.done += 1
        if budget.done % 25 == 0:
            extra = f" locality {locality.item():.4f}" if args.vae_locality_weight else ""
            log(f"vae step {budget.done} loss {loss.item():.4f}{extra} ({budget.elapsed / 60:.1f} min)")
        if budget.done % 200 == 0:
            log_vae_quality(vae)
    log(f"vae: {budget.done} steps in {budget.elapsed / 60:.1f} min")
    log_vae_quality(vae)
    vae.eval()
    # Scale latents to unit variance, measured on whole scenes.
    with torch.no_grad():
        scenes = scene_pixels([random_scene(rng) for _ in range(64)], 256)
        latents = vae.encode(scenes).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    log(f"vae scaling factor {vae.config.scaling_factor:.4f}")
    return vae


def train_decoder(args, rng: random.Random, vae) -> None:
    """Go on training the VAE's decoder alone, on whole scenes of up to 512
    pixels: the encoder, and so the latent space the UNet learnt, stays as it is."""
    vae.requires_grad_(False)
    decoder_params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p in decoder_params:
        p.requires_grad_(True)
    vae.train()
    optimizer = torch.optim.AdamW(decoder_params, lr=args.decoder_lr, weight_decay=0.0)
    budget = Budget(args.decoder_minutes, args.decoder_steps)
    while budget.running():
        # Large flat regions far from any edge exist only in large images; the decoder must see them.
        resolution = rng.choice((128, 256, 512))
        batch = {128: 8, 256: 2, 512: 1}[resolution]
        pixels = scene_pixels([random_scene(rng, two_shapes=0.3) for _ in range(batch)], resolution)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample()
        loss = F.l1_loss(vae.decode(latents).sample, pixels)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.decoder_lr, budget.fraction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        budget.done += 1
        if budget.done % 25 == 0:
            log(f"decoder step {budget.done} loss {loss.item():.4f} ({budget.elapsed / 60:.1f} min)")
    log(f"decoder: {budget.done} steps in {budget.elapsed / 60:.1f} min")
    vae.eval()


# What a caption says of its scene, each a list of the values it can take
# (of the first shape, for two): what caption_attribute_loss reads out.
ATTRIBUTES = {
    "background": list(COLOURS),
    "colour": list(COLOURS),
    "kind": list(SHAPES),
    "position": list(POSITIONS),
}


def caption_attribute_loss(heads, pooled: torch.Tensor, scenes: list[Scene], captions: list[str]) -> torch.Tensor:
    """Cross-entropy of linear read-outs of the scene's background, shape
    colour, kind and position from the pooled caption (dropped captions
    left out).

    A checkpoint of a run without it (10,000 steps) had a pooled caption
    from which a linear probe read the background and shape colour 100% of
    the time, the kind 94%, and the position 41% (chance: 11%): positions
    are phrases ("in the top left corner", "at the top"), and the text
    encoder had not learnt to say them, while its pictures put shapes in
    about the right place no more often than chance. Asking the pooled
    caption to say each attribute plainly is a cheap push (the heads are
    thrown away; the text encoder stays a standard CLIP one). With it at
    0.1, the committed run's checkpoint at 8,000 steps put 100% of the
    shapes in the named place (n=8 per set, 256 and 512)."""
    kept = [i for i, text in enumerate(captions) if text]
    if not kept:
        return pooled.sum() * 0
    logits = heads(pooled[kept]).split([len(values) for values in ATTRIBUTES.values()], dim=1)
    loss = pooled.new_zeros(())
    for (name, values), scores in zip(ATTRIBUTES.items(), logits):
        labels = [values.index(scenes[i].background if name == "background" else getattr(scenes[i].shapes[0], name)) for i in kept]
        loss = loss + F.cross_entropy(scores, torch.tensor(labels))
    return loss / len(ATTRIBUTES)


def train_unet(args, rng: random.Random, vae, scratch: Path, out: Path) -> tuple:
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    write_tokenizer_to = scratch / "tokenizer"
    embedded.write_caption_tokenizer(write_tokenizer_to)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_tokenizer_to))
    if args.unet_init:
        # Go on from a saved pipeline (a finished run or a checkpoint); the
        # tokenizer is rebuilt the same, word for word.
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel.from_pretrained(str(Path(args.unet_init) / "text_encoder"))
        unet = UNet2DConditionModel.from_pretrained(str(Path(args.unet_init) / "unet"))
    else:
        text_encoder = embedded.text_encoder(len(tokenizer))
        unet = embedded.unet()
    # The training noise schedule is the sampler's (same betas).
    noise_schedule = DDPMScheduler.from_config(embedded.scheduler().config)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    if args.caption_attribute_weight:
        # Linear read-outs of the scene from the pooled caption, never saved
        # (caption_attribute_loss). Made only when used: their initial
        # weights take from torch's random stream, which would shift the
        # noise every later step draws.
        attribute_heads = torch.nn.Linear(text_encoder.config.hidden_size, sum(len(values) for values in ATTRIBUTES.values()))
        params += list(attribute_heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    vae.requires_grad_(False)
    budget = Budget(args.unet_minutes, args.unet_steps)
    mix = UNET_RESOLUTIONS[args.unet_sizes]
    resolutions = [r for r, _, _ in mix]
    batches = {r: b for r, b, _ in mix}
    shares = [s for _, _, s in mix]
    losses: list[float] = []
    while budget.running():
        resolution = rng.choices(resolutions, weights=shares)[0]
        scenes = [random_scene(rng) for _ in range(batches[resolution])]
        captions = ["" if rng.random() < CAPTION_DROPOUT else caption(s, rng) for s in scenes]
        with torch.no_grad():
            pixels = scene_pixels(scenes, resolution)
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn_like(latents)
        last = noise_schedule.config.num_train_timesteps - 1
        timesteps = torch.randint(0, last + 1, (len(scenes),))
        if args.first_step_share:
            # The sampler's first step (trailing spacing: the last training
            # step, pure noise) is where the caption alone decides the
            # scene's colours and layout; every later step refines what it
            # drew. A share of each batch goes there rather than the 1/1000
            # a uniform draw gives it.
            timesteps[torch.rand(len(scenes)) < args.first_step_share] = last
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        encoded = text_encoder(ids)
        prediction = unet(noisy, timesteps, encoder_hidden_states=encoded.last_hidden_state).sample
        # v-prediction, unweighted: at the last (pure-noise) step v is minus
        # the clean latents, so that step, where the caption alone decides
        # colours and layout, is learnt at full weight (min-SNR weighting
        # would give it none).
        error = (prediction - noise_schedule.get_velocity(latents, noise, timesteps)) ** 2
        if args.shape_weight:
            # A shape covers a few percent of the latent pixels and the
            # background the rest, so an unweighted loss is mostly about the
            # background: a model trained so drew the background colour
            # asked for and shapes of random colour and place. Latent pixels
            # any shape touches weigh 1 + shape_weight; the mean stays a
            # weighted mean, so the loss's scale does not move.
            touched = F.max_pool2d(shape_masks(scenes, resolution), kernel_size=resolution // latents.shape[-1])
            weight = 1 + args.shape_weight * touched
            loss = (error * weight).mean() / weight.mean()
        else:
            loss = error.mean()
        if args.caption_attribute_weight:
            loss = loss + args.caption_attribute_weight * caption_attribute_loss(attribute_heads, encoded.pooler_output, scenes, captions)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args.unet_lr, budget.fraction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        budget.done += 1
        decay = min(args.ema, (1 + budget.done) / (10 + budget.done))
        with torch.no_grad():
            for model, ema in ((unet, ema_unet), (text_encoder, ema_text)):
                for p, e in zip(model.parameters(), ema.parameters()):
                    e.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if budget.done % 50 == 0:
            log(f"unet step {budget.done} loss {np.mean(losses[-50:]):.4f} ({budget.elapsed / 60:.1f} min)")
        if args.checkpoint_steps and budget.done % args.checkpoint_steps == 0:
            # The EMA weights so far, as a whole pipeline: the eval script can score a run as it goes.
            save(out / "checkpoint", vae, tokenizer, ema_text, ema_unet)
            log(f"checkpoint at step {budget.done}: {out / 'checkpoint'}")
    log(f"unet: {budget.done} steps in {budget.elapsed / 60:.1f} min")
    return tokenizer, ema_text, ema_unet


def save(out: Path, vae, tokenizer, text_encoder, unet) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=embedded.scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "models" / "embedded-sd"), help="pipeline directory to write")
    parser.add_argument(
        "--stage", choices=("all", "vae", "unet", "decoder"), default="all",
        help="unet and decoder reuse --out's vae; all runs vae, unet, decoder",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vae-minutes", type=float, default=28.0)
    parser.add_argument("--vae-steps", type=int, help="a step count instead of --vae-minutes")
    parser.add_argument("--vae-batch", type=int, default=8, help="scenes of 128 pixels per step (twice as many of 64)")
    parser.add_argument("--vae-init", help="a VAE folder to continue training from, instead of new weights")
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument(
        "--vae-palette-weight", type=float, default=1.0,
        help="weight of the loss on every named colour as a flat background, each step (0: scenes only)",
    )
    parser.add_argument(
        "--vae-shape-weight", type=float, default=4.0,
        help="extra reconstruction weight on the shapes' pixels (0: every pixel alike, as the VAE committed before 2026-12-02 was trained)",
    )
    parser.add_argument(
        "--vae-locality-weight", type=float, default=0.0,
        help="weight of the term that makes a latent pixel encode the same whatever lies away from it (0: none)",
    )
    parser.add_argument("--unet-minutes", type=float, default=85.0)
    parser.add_argument("--unet-steps", type=int, help="a step count instead of --unet-minutes")
    parser.add_argument("--unet-lr", type=float, default=5e-4)
    parser.add_argument("--unet-sizes", choices=sorted(UNET_RESOLUTIONS), default="256-512", help="the image sizes the UNet trains on")
    parser.add_argument(
        "--first-step-share", type=float, default=0.25,
        help="share of the UNet's samples trained at the pure-noise step the sampler starts from",
    )
    parser.add_argument(
        "--shape-weight", type=float, default=2.0,
        help="extra loss weight on the latent pixels a shape touches (0: every pixel alike)",
    )
    parser.add_argument(
        "--caption-attribute-weight", type=float, default=0.1,
        help="weight of the loss that reads each scene's background, shape colour, kind and position from the pooled caption "
        "(0: none, as the weights committed before the second set of 2026-12-02 were trained)",
    )
    parser.add_argument(
        "--unet-init", help="a pipeline folder whose UNet and text encoder to continue training from, instead of new weights"
    )
    parser.add_argument("--decoder-minutes", type=float, default=0.0, help="the decoder-only stage after the UNet (0: none)")
    parser.add_argument("--decoder-steps", type=int, help="a step count instead of --decoder-minutes")
    parser.add_argument("--decoder-lr", type=float, default=5e-4)
    parser.add_argument("--decoder-out", help="where the decoder stage writes the VAE (default: --out's vae)")
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--checkpoint-steps", type=int, help="also save the UNet stage's weights so far to OUT/checkpoint every this many steps")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    started = time.monotonic()
    from diffusers import AutoencoderKL

    if args.stage == "decoder":
        vae = AutoencoderKL.from_pretrained(str(out / "vae"))
        train_decoder(args, random.Random(args.seed + 2), vae)
        target = Path(args.decoder_out or out / "vae")
        vae.save_pretrained(str(target), safe_serialization=True)
        log(f"wrote {target} in {(time.monotonic() - started) / 60:.1f} min")
        return
    if args.stage in ("all", "vae"):
        vae = train_vae(args, rng)
        if args.stage == "vae":
            vae.save_pretrained(str(out / "vae"), safe_serialization=True)
            log(f"wrote {out / 'vae'} in {(time.monotonic() - started) / 60:.1f} min")
            return
    else:
        vae = AutoencoderKL.from_pretrained(str(out / "vae")).eval()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer, text_encoder, unet = train_unet(args, random.Random(args.seed + 1), vae, Path(scratch), out)
        if args.stage == "all" and (args.decoder_minutes or args.decoder_steps):
            train_decoder(args, random.Random(args.seed + 2), vae)
        save(out, vae, tokenizer, text_encoder, unet)
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*.safetensors")}
    log(f"wrote {out}: {json.dumps(sizes)}, {sum(sizes.values()) / 1e6:.1f} MB")
    log(f"total wall time {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
