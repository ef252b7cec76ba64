"""Train the demo checkpoint: a small FLUX.1 (diffusers classes and layout) that draws the shapes data set.

    python -m omni_backend.demo.train --out DIR [--seed 0] [--vae-steps N] [--steps N] [--threads 2]

Three phases, all seeded (same arguments and torch build, same weights):

1. text: CLIP and T5 text encoders with tokenizers trained locally on the captions (every word of
   the grammar is one token); random weights, frozen: distinct words already give distinct
   embeddings, and the transformer learns to read them. The 168 captions are encoded once.
2. VAE: an ``AutoencoderKL`` with FLUX's 16 latent channels and 4x downsampling (three levels: a
   64x64 picture is 16x16 latents, 64 packed tokens), trained on fresh pictures every step (L1 + MSE
   + small KL). FLUX.1's 8x (four levels, ``--vae-channels 16,32,64,64``) learned ~3x slower here:
   at 8x8 latents the decoder must invent every edge from one latent per 8x8 block; after 7000
   steps its reconstructions still classified only 82% of colors and 88% of shapes right, a ceiling
   under the quality target. The reconstruction rates are printed after this phase.
   Its latent mean / std become ``shift_factor`` / ``scaling_factor``, as FLUX.1's VAE has them.
3. transformer: ``FluxTransformer2DModel`` without guidance embedding (schnell-like), trained
   with FLUX's rectified flow on fresh pictures encoded by the frozen VAE:
   ``x_t = (1 - t) x0 + t noise``, target ``noise - x0``; ``t`` is uniform then shifted by the
   same ``exp(mu)`` the pipeline's dynamic shifting applies at 64 tokens, so training covers
   exactly the sigmas sampling visits. The learning rate is constant, then falls linearly to 0 over the
   last ``cooldown_steps`` (53% shapes against 44% without it). The saved weights are an exponential
   moving average.
   The shape word is the hardest thing to learn: it decides only the pixels where the three shapes
   of a box differ, and only while t is in ``SHAPE_BAND``; so those pixels' latent tokens weigh
   ``1 + edge_weight`` in the MSE, and ``band_fraction`` of each batch draws t from the band.
   ``caption_dropout`` of the pictures train with the empty caption (true CFG at sampling).

Writes ``DIR`` (``FluxPipeline.save_pretrained`` layout, safetensors) and, beside the weights,
``DIR/training/loss.csv`` and ``loss.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from omni_backend.demo import shapes
from omni_backend.testing.tiny import FLUX_SCHEDULER_CONFIG, _quiet_progress_bars
from omni_backend.testing.tokenizers import CORPUS, build_clip_tokenizer, build_t5_tokenizer

# T5 tokens per prompt: a caption is 7 words (one token each) + </s>; FLUX.1-schnell serves 256, dev
# 512. Kept that short because every text token rides through every transformer block: 8 instead of
# 512 makes training and serving ~20x cheaper at this size. The T5 tokenizer saved with the checkpoint
# declares it (``model_max_length``), so the served model uses it without a config parameter.
MAX_SEQUENCE_LENGTH = 8
# Where sampling decides the shape: pictures noised to t0 and sampled back keep their shape from 0.6,
# lose it from 0.8 (and a model that ignores the shape word cannot get it back there)
SHAPE_BAND = (0.55, 0.9)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters (defaults: the committed checkpoint)."""

    seed: int = 0
    vae_steps: int = 2500
    vae_batch: int = 8
    vae_crop: int = 32  # the VAE is fully convolutional: it learns edges and colors on crops, 4x cheaper
    vae_lr: float = 2e-3
    latents: int = 8192  # pictures encoded once for the transformer phase
    steps: int = 26000
    batch: int = 16
    lr: float = 1e-3
    ema: float = 0.995
    save_every: int = 1000
    hidden: int = 128  # transformer width = heads x head dim
    layers: int = 2  # double-stream blocks
    single_layers: int = 2
    vae_channels: tuple[int, ...] = (16, 32, 64)
    # GroupNorm over few channels per group wipes out what a flat-colored region is: its color
    vae_groups: int = 1
    text_dim: int = 32
    train_text: bool = False  # train both text encoders with the transformer (else frozen random)
    caption_dropout: float = 0.1  # fraction of pictures trained with the empty caption (enables true CFG)
    # extra MSE weight of the latent tokens over the pixels where the three shapes of the picture's box
    # differ (shapes.shape_word_pixels): all the shape word decides, a few % of a picture
    edge_weight: float = 8.0
    band_fraction: float = 0.5  # fraction of each batch with t uniform in SHAPE_BAND instead of the pipeline's
    # the transformer's learning rate falls linearly to 0 over the last cooldown_steps (0: constant to the end)
    cooldown_steps: int = 6000


def build_components(cfg: TrainConfig) -> dict[str, object]:
    """Untrained FluxPipeline components, seeded."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    corpus = (*CORPUS, *(scene.caption for scene in shapes.all_scenes()))
    tokenizer, tokenizer_2 = build_clip_tokenizer(corpus=corpus), build_t5_tokenizer(corpus=corpus)
    tokenizer_2.model_max_length = MAX_SEQUENCE_LENGTH  # what the served model reads (FluxOptions)
    d = cfg.text_dim
    torch.manual_seed(cfg.seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=d,
            intermediate_size=2 * d,
            projection_dim=d,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=d,
            d_kv=d // 2,
            d_ff=2 * d,
            num_layers=2,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=cfg.vae_groups,
        sample_size=shapes.SIZE,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,  # fully convolutional
    )
    heads = cfg.hidden // 32
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=cfg.layers,
        num_single_layers=cfg.single_layers,
        attention_head_dim=32,
        num_attention_heads=heads,
        joint_attention_dim=d,
        pooled_projection_dim=d,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
    }


def pictures(n: int, seed: int) -> tuple[torch.Tensor, list[shapes.Scene]]:
    """``n`` fresh pictures as float [n, 3, 64, 64] in [-1, 1], with their scenes."""
    images, scenes = shapes.sample(n, seed)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0, scenes


class LossLog:
    """Loss per step of each phase, for the CSV and the curve."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, float]] = []

    def add(self, phase: str, step: int, loss: float) -> None:
        self.rows.append((phase, step, loss))

    def write(self, folder: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "loss.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["phase", "step", "loss"])
            writer.writerows(self.rows)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, phase in zip(axes, ("vae", "transformer"), strict=True):
            losses = np.array([loss for p, _, loss in self.rows if p == phase])
            if len(losses) == 0:
                continue
            window = max(1, len(losses) // 50)  # moving average over 2% of the run
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(losses, alpha=0.25, color="tab:blue")
            ax.plot(np.arange(len(smooth)) + window - 1, smooth, color="tab:blue")
            ax.set(title=f"{phase} loss", xlabel="step", yscale="log")
        fig.tight_layout()
        fig.savefig(folder / "loss.png", dpi=100)
        plt.close(fig)


def lr_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total: int = 0, cooldown: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, constant, then (``cooldown`` > 0) a linear fall to 0 over the last ``cooldown`` of
    ``total`` steps. Before the cool-down a run stopped at step K equals a run of K steps (exact snapshots)."""

    def factor(step: int) -> float:
        rising = min(1.0, (step + 1) / warmup)
        return rising * min(1.0, (total - step) / cooldown) if cooldown > 0 else rising

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_vae(vae, cfg: TrainConfig, log: LossLog) -> None:
    """Reconstruction (L1 + MSE) of the posterior mean + a light KL keeping the latents near N(0, 1).

    The mean, not a sample, is decoded: the transformer is trained on the means, and sampling noise
    of unit variance at initialization hides the signal for the first hundreds of steps.
    """
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    schedule = lr_schedule(optimizer, warmup=20)
    generator = torch.Generator().manual_seed(cfg.seed)
    vae.train()
    for step in (bar := tqdm(range(cfg.vae_steps), desc="vae", dynamic_ncols=True)):
        x, _ = pictures(cfg.vae_batch, seed=1_000_000 * (cfg.seed + 1) + step)
        top, left = (8 * torch.randint((shapes.SIZE - cfg.vae_crop) // 8 + 1, (2,), generator=generator)).tolist()
        x = x[:, :, top : top + cfg.vae_crop, left : left + cfg.vae_crop]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean).sample
        kl = posterior.kl().mean() / x[0].numel()
        error = recon - x
        loss = error.abs().mean() + error.pow(2).mean() + 1e-4 * kl  # MSE pulls large errors (edges) down fast
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        log.add("vae", step, loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval().requires_grad_(False)


@torch.no_grad()
def reconstruction_accuracy(vae, seed: int, n: int = 200) -> dict[str, float]:
    """The classifiers' rates on VAE reconstructions: the ceiling of what the transformer can reach."""
    x, scenes = pictures(n, seed=seed)
    recon = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in x.split(50)])
    images = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    accuracy = shapes.Accuracy()
    for scene, image in zip(scenes, images, strict=True):
        accuracy.add(scene, image)
    return accuracy.rates()


@torch.no_grad()
def set_latent_statistics(vae, seed: int) -> None:
    """FLUX's VAE normalizes latents as ``(z - shift_factor) * scaling_factor``: measure both."""
    x, _ = pictures(512, seed=seed)
    z = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in x.split(64)])
    vae.register_to_config(shift_factor=round(z.mean().item(), 4), scaling_factor=round(1.0 / z.std().item(), 4))


@torch.no_grad()
def packed_latents(pipe, x: torch.Tensor) -> torch.Tensor:
    """Pictures [N, 3, 64, 64] as the transformer sees them: VAE means, normalized as FLUX's VAE config
    says, packed 2x2 into tokens [N, 64, 64]."""
    vae = pipe.vae
    z = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    return pipe._pack_latents(z, *z.shape)


@torch.no_grad()
def encode_pictures(pipe, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pool of ``cfg.latents`` pictures: normalized, packed latents [N, 64, 64], caption ids [N] and,
    per latent token [N, 64], the fraction of its pixels the shape word decides (shapes.shape_word_pixels).

    Encoding is what a training step would spend most on; the pool is reused with fresh noise and
    timesteps every epoch (positions and sizes are continuous, so 12k pictures rarely repeat a layout).
    """
    index = {scene: i for i, scene in enumerate(shapes.all_scenes())}
    latents, ids, decisive = [], [], []
    for chunk in tqdm(range(0, cfg.latents, 256), desc="encode", dynamic_ncols=True):
        x, scenes = pictures(min(256, cfg.latents - chunk), seed=3_000_000 * (cfg.seed + 1) + chunk)
        packed = packed_latents(pipe, x)
        latents.append(packed)
        ids += [index[scene] for scene in scenes]
        side = math.isqrt(packed.shape[1])  # tokens per side
        for picture, scene in zip(x, scenes, strict=True):
            background = torch.tensor(shapes.PALETTE[scene.background], dtype=torch.float32) / 127.5 - 1
            mask = ((picture - background[:, None, None]).abs().amax(0) > 1e-3).numpy()
            pixels = torch.from_numpy(shapes.shape_word_pixels(mask)).float()[None, None]
            decisive.append(torch.nn.functional.avg_pool2d(pixels, shapes.SIZE // side).flatten())
    return torch.cat(latents), torch.tensor(ids), torch.stack(decisive)


def flow_batch(pipe, pool, text, cfg: TrainConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One rectified-flow batch from the pool: transformer inputs and the velocity target."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    latents, ids, decisive = pool
    pick = torch.randint(len(ids), (cfg.batch,), generator=generator)
    x0, caption = latents[pick], ids[pick]
    if cfg.caption_dropout > 0:  # (drawn only then: the committed run's random stream stays as it was)
        dropped = torch.rand(cfg.batch, generator=generator) < cfg.caption_dropout
        caption = torch.where(dropped, len(shapes.all_scenes()), caption)  # the empty caption comes last
    noise = torch.randn(x0.shape, generator=generator)
    conf = pipe.scheduler.config
    mu = calculate_shift(x0.shape[1], conf.base_image_seq_len, conf.max_image_seq_len, conf.base_shift, conf.max_shift)
    u = torch.rand(cfg.batch, generator=generator).clamp(min=1e-3)
    t = math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # the pipeline's time_shift of a uniform t
    if cfg.band_fraction > 0:  # (drawn only then, as for caption dropout)
        band = torch.rand(cfg.batch, generator=generator) < cfg.band_fraction
        low, high = SHAPE_BAND
        t = torch.where(band, low + (high - low) * torch.rand(cfg.batch, generator=generator), t)
    side = int(math.isqrt(x0.shape[1]))  # packed tokens per side
    embeds, pooled = text
    return {
        "hidden_states": (1 - t[:, None, None]) * x0 + t[:, None, None] * noise,
        "timestep": t,  # FluxTransformer2DModel multiplies by 1000, as the pipeline passes t / 1000
        "pooled_projections": pooled[caption],
        "encoder_hidden_states": embeds[caption],
        "txt_ids": torch.zeros(embeds.shape[1], 3),
        "img_ids": pipe._prepare_latent_image_ids(cfg.batch, side, side, x0.device, x0.dtype),
        "target": noise - x0,
        "weight": 1 + cfg.edge_weight * decisive[pick],  # per token
    }


class EMA:
    """Exponential moving average of a module's weights (what is saved: smoother than the last step)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.shadow = [p.detach().clone() for p in module.parameters()]

    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: early weights fade quickly
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.module.parameters()], 1 - decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily load the averaged weights (e.g. to save them)."""
        live = [p.detach().clone() for p in self.module.parameters()]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.module.parameters()], self.shadow)
            try:
                yield
            finally:
                torch._foreach_copy_([p.data for p in self.module.parameters()], live)


def train_transformer(pipe, cfg: TrainConfig, log: LossLog, out: Path) -> None:
    """Rectified flow on the latent pool; saves the EMA pipeline every ``cfg.save_every`` steps and at the end."""
    transformer = pipe.transformer
    captions = [scene.caption for scene in shapes.all_scenes()] + [""]  # "" for caption dropout

    def encode_captions() -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(captions, prompt_2=None, max_sequence_length=MAX_SEQUENCE_LENGTH)
        return embeds, pooled

    trained = torch.nn.ModuleList([transformer] + ([pipe.text_encoder, pipe.text_encoder_2] if cfg.train_text else []))
    with torch.no_grad():
        text = encode_captions()
    pool = encode_pictures(pipe, cfg)
    ema = EMA(trained, cfg.ema)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = lr_schedule(optimizer, warmup=50, total=cfg.steps, cooldown=cfg.cooldown_steps)
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    trained.train().requires_grad_(True)
    for step in (bar := tqdm(range(cfg.steps), desc="transformer", dynamic_ncols=True)):
        if cfg.train_text:  # 169 captions of 8 tokens: encoding them all each step costs little
            text = encode_captions()
        batch = flow_batch(pipe, pool, text, cfg, generator)
        target, weight = batch.pop("target"), batch.pop("weight")
        pred = transformer(**batch, guidance=None, return_dict=False)[0]
        loss = ((pred - target).pow(2).mean(-1) * weight).sum() / weight.sum()  # plain MSE at edge_weight 0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.update(step)
        log.add("transformer", step, loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            with ema.applied():
                save(pipe, out, log, {"steps_done": step + 1})
    trained.eval().requires_grad_(False)


def save(pipe, out: Path, log: LossLog, info: dict[str, object]) -> None:
    """The pipeline in diffusers layout, its loss curve and ``training/info.json``."""
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_progress_bars():
        pipe.save_pretrained(out, safe_serialization=True)
    index_path = out / "model_index.json"  # name the T5 tokenizer like FLUX.1-dev (see testing/tiny.py)
    index = json.loads(index_path.read_text())
    index["tokenizer_2"] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    log.write(out / "training")
    (out / "training" / "info.json").write_text(json.dumps(info, indent=2) + "\n")


def train(out: Path, cfg: TrainConfig) -> Path:
    """Train all phases and save the pipeline to ``out``; returns ``out``."""
    from diffusers import FluxPipeline

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    pipe = FluxPipeline(**build_components(cfg))
    for module in (pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)
    log = LossLog()
    train_vae(pipe.vae, cfg, log)
    recon = reconstruction_accuracy(pipe.vae, seed=cfg.seed + 11)
    tqdm.write("vae reconstructions: " + "  ".join(f"{k} {v:.0%}" for k, v in recon.items()))
    set_latent_statistics(pipe.vae, seed=cfg.seed + 7)
    train_transformer(pipe, cfg, log, out)
    minutes = (time.perf_counter() - start) / 60
    info = {
        **asdict(cfg),
        "vae_reconstruction_accuracy": recon,
        "minutes": round(minutes, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    (out / "training" / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_backend.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    defaults = TrainConfig()
    ints = ("seed", "vae_steps", "vae_batch", "vae_crop", "latents", "steps", "batch", "save_every", "hidden")
    for name in (*ints, "layers", "single_layers", "cooldown_steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("vae_lr", "lr", "ema", "caption_dropout", "edge_weight", "band_fraction"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument("--train-text", action="store_true", help="train the text encoders with the transformer")
    parser.add_argument(
        "--vae-channels",
        type=lambda text: tuple(int(c) for c in text.split(",")),
        default=defaults.vae_channels,
        help="VAE block widths, one level each: 3 levels downsample 4x, 4 levels 8x (default %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = vars(parser.parse_args(argv))
    out, threads = args.pop("out"), args.pop("threads")
    torch.set_num_threads(threads)
    cfg = TrainConfig(**args)
    train(out, cfg)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
