"""Full-size timing: the real architectures of FLUX.1-dev, Qwen-Image and Wan2.2 with random weights.

Timing does not depend on weight values, so no download is needed: every component is built
from the published architecture config (diffusers' and transformers' classes; the transformer
defaults of diffusers ARE the released configs) directly on the device in the benchmark dtype
(bf16 by default), assembled into the diffusers pipeline of the family, and timed end to end
(text encoding, the denoising loop, VAE decode) after a warm-up call. Tokenizers are the tiny
locally trained ones: token ids stay inside the real vocabularies, which is all the timing needs.

    python -m benchmarks.full_size --family flux [--height 1024 --width 1024 --steps 28 --repeats 3]
    python -m benchmarks.full_size --check       # CPU: build on the meta device, count parameters
    python -m benchmarks.full_size --smoke       # CPU: the same code on width/depth-reduced configs
    python -m benchmarks.full_size --family flux --ours   # and our stages per offload mode, same weights

Published reference points: FLUX.1-dev on one H100, 1024x1024, 28 steps: 6.71 s (xDiT's table);
Qwen-Image, 1024x1024, 50 steps: 20.0 s (vLLM-Omni's docs, baseline). Results go to
``benchmarks/results/full_size.csv`` (one row per family and run) and to RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.full_size_stages import OFFLOAD_MODES, STAGE_OPTIONS, time_stages

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"


@dataclass(frozen=True)
class FamilySpec:
    """How to build one family at full size, and what its parts weigh when released."""

    pipeline: str  # diffusers pipeline class
    build: Callable[[bool], dict[str, Any]]  # smoke -> pipeline components (on the current default device)
    published_params_b: dict[str, float]  # component -> parameters in billions, as released
    defaults: dict[str, Any] = field(default_factory=dict)  # call arguments of a timing run
    reference: str = ""  # a published figure to put next to ours


def _on_cpu(factory: Callable[..., Any], **kwargs: Any) -> Any:
    """Schedulers keep their tables on the CPU whatever device the models are built on."""
    with torch.device("cpu"):
        return factory(**kwargs)


def _shrink(smoke: bool, full: int, small: int) -> int:
    return small if smoke else full


# ---------------------------------------------------------------------- FLUX.1-dev


def _clip_l(smoke: bool, vocab_size: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(  # openai/clip-vit-large-patch14, text tower
            vocab_size=49408,
            hidden_size=_shrink(smoke, 768, 32),
            intermediate_size=_shrink(smoke, 3072, 64),
            projection_dim=_shrink(smoke, 768, 32),
            num_hidden_layers=_shrink(smoke, 12, 1),
            num_attention_heads=_shrink(smoke, 12, 2),
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            eos_token_id=vocab_size - 1,  # the tiny tokenizer's ids; the pooled output is taken at eos
        )
    )


def _t5_xxl(smoke: bool, vocab_size: int) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(  # google/t5-v1_1-xxl encoder, as FLUX.1 ships it
            vocab_size=vocab_size,
            d_model=_shrink(smoke, 4096, 32),
            d_kv=_shrink(smoke, 64, 16),
            d_ff=_shrink(smoke, 10240, 64),
            num_layers=_shrink(smoke, 24, 1),
            num_heads=_shrink(smoke, 64, 2),
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
        )
    )


def build_flux(smoke: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from omni_backend.testing.tiny import FLUX_SCHEDULER_CONFIG
    from omni_backend.testing.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    transformer_kwargs: dict[str, Any] = {"guidance_embeds": True}  # diffusers' defaults are FLUX.1's
    if smoke:
        transformer_kwargs.update(
            num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
        )  # fmt: skip
    vae_channels = (8, 16, 16, 16) if smoke else (128, 256, 512, 512)
    return {
        "scheduler": _on_cpu(FlowMatchEulerDiscreteScheduler, **FLUX_SCHEDULER_CONFIG),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        # T5's vocabulary is 32128 in the release; the tiny tokenizer's ids fit in any vocabulary
        "text_encoder": _clip_l(smoke, len(tokenizer)),
        "text_encoder_2": _t5_xxl(smoke, 32128 if not smoke else len(tokenizer_2)),
        "vae": AutoencoderKL(  # black-forest-labs/FLUX.1-dev vae/config.json
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=vae_channels,
            layers_per_block=_shrink(smoke, 2, 1),
            latent_channels=16,
            norm_num_groups=_shrink(smoke, 32, 8),
            sample_size=1024,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        "transformer": FluxTransformer2DModel(**transformer_kwargs),
    }


# ---------------------------------------------------------------------- Wan2.2 T2V A14B


def build_wan22_t2v(smoke: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from omni_backend.testing.tokenizers import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    # diffusers' defaults of WanTransformer3DModel are the 14B expert (5120 wide, 40 layers)
    expert: dict[str, Any] = {}
    if smoke:
        expert = {"num_attention_heads": 2, "attention_head_dim": 12, "text_dim": 32, "freq_dim": 16,
                  "ffn_dim": 32, "num_layers": 1}  # fmt: skip
    return {
        "tokenizer": tokenizer,
        "text_encoder": UMT5EncoderModel(
            UMT5Config(  # google/umt5-xxl encoder
                vocab_size=_shrink(smoke, 256384, len(tokenizer)),
                d_model=_shrink(smoke, 4096, 32),
                d_kv=_shrink(smoke, 64, 16),
                d_ff=_shrink(smoke, 10240, 64),
                num_layers=_shrink(smoke, 24, 1),
                num_heads=_shrink(smoke, 64, 2),
                feed_forward_proj="gated-gelu",
                tie_word_embeddings=False,
            )
        ),
        "vae": AutoencoderKLWan(**({"base_dim": 8, "z_dim": 16, "dim_mult": [1, 1, 1, 1]} if smoke else {})),
        # Wan2.2-T2V-A14B: flow-matching UniPC, shift 12, high-noise expert above 0.875 of the schedule
        "scheduler": _on_cpu(
            UniPCMultistepScheduler, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=12.0
        ),
        "transformer": WanTransformer3DModel(**expert),
        "transformer_2": WanTransformer3DModel(**expert),
        "boundary_ratio": 0.875,
    }


# ---------------------------------------------------------------------- Qwen-Image


def _qwen25_vl_7b(tokenizer: Any) -> torch.nn.Module:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(  # Qwen/Qwen2.5-VL-7B-Instruct, as Qwen-Image ships it
            text_config={
                "vocab_size": 152064,
                "hidden_size": 3584,
                "intermediate_size": 18944,
                "num_hidden_layers": 28,
                "num_attention_heads": 28,
                "num_key_value_heads": 4,
                "max_position_embeddings": 128000,
                "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
                "tie_word_embeddings": False,
            },
            vision_config={
                "depth": 32,
                "hidden_size": 1280,
                "intermediate_size": 3420,
                "num_heads": 16,
                "out_hidden_size": 3584,
                "patch_size": 14,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "window_size": 112,
                "fullatt_block_indexes": [7, 15, 23, 31],
            },
            # the tiny tokenizer's ids of the special tokens (all inside the real vocabulary)
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
        )
    )


def build_qwen_image(smoke: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from omni_backend.testing.tiny_qwen import QWEN_IMAGE_SCHEDULER_CONFIG, qwen_image_components
    from omni_backend.testing.tokenizers import build_qwen2_tokenizer

    if smoke:  # the tiny checkpoint's own components: the same classes, narrow
        return qwen_image_components(seed=0)
    tokenizer = build_qwen2_tokenizer()
    return {  # diffusers' defaults of both classes are Qwen-Image's released configs
        "scheduler": _on_cpu(FlowMatchEulerDiscreteScheduler, **QWEN_IMAGE_SCHEDULER_CONFIG),
        "vae": AutoencoderKLQwenImage(),
        "text_encoder": _qwen25_vl_7b(tokenizer),
        "tokenizer": tokenizer,
        "transformer": QwenImageTransformer2DModel(),
    }


FAMILIES: dict[str, FamilySpec] = {
    "flux": FamilySpec(
        pipeline="FluxPipeline",
        build=build_flux,
        # FLUX.1-dev: 12B transformer; T5-XXL encoder 4.76B; CLIP-L text 0.12B; VAE 0.08B
        published_params_b={"transformer": 11.90, "text_encoder_2": 4.76, "text_encoder": 0.123, "vae": 0.084},
        defaults={"height": 1024, "width": 1024, "num_inference_steps": 28, "guidance_scale": 3.5},
        reference="FLUX.1-dev, 1 x H100, 1024x1024, 28 steps: 6.71 s (xDiT)",
    ),
    "qwen_image": FamilySpec(
        pipeline="QwenImagePipeline",
        build=build_qwen_image,
        # Qwen-Image: 20B MMDiT; Qwen2.5-VL-7B text encoder (8.29B with its vision tower)
        published_params_b={"transformer": 20.0, "text_encoder": 8.29},
        defaults={
            "height": 1024,
            "width": 1024,
            "num_inference_steps": 50,
            "true_cfg_scale": 4.0,
            "negative_prompt": " ",
        },  # fmt: skip
        reference="Qwen-Image, 1024x1024, 50 steps: 20.0 s baseline (vLLM-Omni docs)",
    ),
    "wan22_t2v": FamilySpec(
        pipeline="WanPipeline",
        build=build_wan22_t2v,
        # Wan2.2-T2V-A14B: two 14B experts ("A14B": 27B in all, 14B active per step)
        published_params_b={"transformer": 14.0, "transformer_2": 14.0},
        defaults={
            "height": 480,
            "width": 832,
            "num_frames": 81,
            "num_inference_steps": 40,
            "guidance_scale": 4.0,
            "guidance_scale_2": 3.0,
        },  # fmt: skip
        reference="Wan2.2-T2V-A14B, 480x832, 81 frames, 40 steps",
    ),
}


@contextlib.contextmanager
def default_device_and_dtype(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on ``device`` in ``dtype`` (no fp32 copy on the host first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def parameter_counts(components: dict[str, Any]) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in components.items()
        if isinstance(module, torch.nn.Module)
    }


def build_pipeline(family: str, device: str, dtype: torch.dtype, smoke: bool) -> Any:
    import diffusers

    spec = FAMILIES[family]
    with default_device_and_dtype(device, dtype), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        components = spec.build(smoke)
    pipe = getattr(diffusers, spec.pipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class FamilyRun:
    row: dict[str, Any]  # the CSV row
    pipe: Any  # the built pipeline: ``--ours`` times it again through our stages
    call: dict[str, Any]  # the pipeline call's arguments
    output: Any  # diffusers' output for seed 1 (float in [0, 1]): ``--ours`` reports its distance to it


def time_family(family: str, args: argparse.Namespace) -> FamilyRun:
    """Build, warm up once, then time ``args.repeats`` end-to-end calls of the diffusers pipeline."""
    spec = FAMILIES[family]
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    started = time.perf_counter()
    pipe = build_pipeline(family, args.device, dtype, args.smoke)
    build_s = time.perf_counter() - started
    call = dict(spec.defaults)
    for key in ("height", "width", "num_inference_steps", "num_frames"):
        if getattr(args, key) is not None:
            call[key] = getattr(args, key)
    if args.smoke:
        call.update(height=64, width=64, num_inference_steps=2)
        if "num_frames" in call:
            call["num_frames"] = 5

    first: list[Any] = []  # the output of seed 1, which ``--ours`` compares its own with

    def run_once(seed: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if seed == 1:
            first.append(out[0][0])  # images / frames of the one prompt
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_once(0)  # warm-up: kernels, allocator, cuDNN autotuning
    times = [run_once(seed) for seed in range(1, args.repeats + 1)]
    peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    row = {
        "family": family,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype,
        "height": call["height"],
        "width": call["width"],
        "steps": call["num_inference_steps"],
        "frames": call.get("num_frames", 1),
        "smoke": args.smoke,
        "build_s": round(build_s, 2),
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "s_per_step": round(statistics.median(times) / call["num_inference_steps"], 4),
        "peak_gb": round(peak_gb, 2),
        "params": sum(parameter_counts(pipe.components).values()),
        "torch": torch.__version__,
        "reference": spec.reference,
    }
    return FamilyRun(row, pipe, call, first[0])


def parameter_table(families: list[str]) -> list[tuple[str, str, float, float]]:
    """Build every family on the meta device: (family, component, ours, released) in billions."""
    rows = []
    for family in families:
        spec = FAMILIES[family]
        with default_device_and_dtype("meta", torch.bfloat16):
            counts = parameter_counts(spec.build(False))
        rows += [(family, name, counts[name] / 1e9, released) for name, released in spec.published_params_b.items()]
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", choices=sorted(FAMILIES), help="default: all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--num-inference-steps", "--steps", dest="num_inference_steps", type=int)
    parser.add_argument("--num-frames", type=int, help="video families")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="count parameters on the meta device and exit")
    parser.add_argument("--smoke", action="store_true", help="reduced widths and depths, 64x64, 2 steps")
    parser.add_argument("--ours", action="store_true", help="also time our stages on the same weights")
    parser.add_argument("--offload", nargs="+", default=list(OFFLOAD_MODES), choices=OFFLOAD_MODES,
                        help="with --ours: the offload modes to time, in this order")  # fmt: skip
    parser.add_argument("--batch", type=int, default=1, help="with --ours: requests per step batch")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "full_size.csv")
    args = parser.parse_args(argv)
    families = args.family or sorted(FAMILIES)
    if args.check:
        for family, name, ours, released in parameter_table(families):
            print(f"{family:12s} {name:16s} {ours:8.3f} B  (released: {released:.3f} B)")
        return 0
    if args.device.startswith("cpu") and not args.smoke:
        parser.error("full-size timing needs a GPU (--device cuda); use --smoke or --check on a CPU")
    if args.ours and set(families) - set(STAGE_OPTIONS):
        parser.error(f"--ours drives {', '.join(sorted(STAGE_OPTIONS))}; pick those with --family")
    for family in families:
        run = time_family(family, args)
        print(", ".join(f"{k}={v}" for k, v in run.row.items()), flush=True)
        write_csv([run.row], args.out)  # row by row: a run cut short keeps what it measured
        if args.ours:
            rows = time_stages(family, run.pipe, run.call, PROMPT, run.output, args)
            write_csv(rows, args.out.with_name("full_size_stages.csv"))
        del run
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
