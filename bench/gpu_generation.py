"""GPU benchmark: real-size FLUX.1-schnell and SDXL-Turbo architectures with random weights.

Run on a CUDA machine: `make bench-gpu` (or, from backend/, `python ../bench/gpu_generation.py`).
No weights are downloaded: every component is built from its published configuration with
random bf16 weights (compute does not depend on the weight values), and the tokenizers are the
tiny character-level ones, padded to the real sequence lengths (77 CLIP tokens, 256 T5 tokens
for schnell), so every matrix has its real shape.

Each model runs through DiffusersGenerator (the worker thread, one batched call, one
torch.Generator per image, the family defaults) and as a bare pipeline call:
- FLUX.1-schnell: 4 images at 1024x1024, 4 steps, guidance 0;
- SDXL-Turbo: 4 images at 512x512, 4 steps, guidance 0.
It prints latency, images per second, the FLOPs of one request (counted by
torch.utils.flop_counter) and the share of the GPU's bf16 peak that reaches.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BACKEND_DIR = Path(__file__).resolve().parents[1] / "backend"
sys.path.insert(0, str(BACKEND_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from report import Row, print_table  # noqa: E402

from services.generation.base import GenerationRequest  # noqa: E402
from services.generation.generators.local import DiffusersGenerator  # noqa: E402
from tools.make_tiny_model import _clip_tokenizer, _t5_tokenizer  # noqa: E402

# Dense bf16 tensor-core peak of an H100/H200 SXM (spec sheet), and what a large bf16 matmul
# reaches on the device in practice; shares are reported against both.
SPEC_PEAK_TFLOPS = 989.0
MEASURED_PEAK_TFLOPS = 790.0


def _vae(latent_channels: int, **extra: Any) -> Any:
    """The FLUX / SDXL autoencoder: four blocks of 128-512 channels, two layers each."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=latent_channels,
        **extra,
    )


def _clip_text_config(hidden: int, layers: int, heads: int, activation: str = "quick_gelu") -> Any:
    """A CLIP text tower: CLIP ViT-L/14 (768) or OpenCLIP bigG (1280)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=activation,
        projection_dim=hidden,
    )


def flux_schnell() -> Any:
    """FLUX.1-schnell: 12B transformer, T5-XXL encoder, CLIP-L, 16-channel VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = _clip_tokenizer(), _t5_tokenizer(max_length=512)
    with torch.device("cpu"):  # schedulers keep host arrays
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=False, num_train_timesteps=1000
        )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(
            16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=CLIPTextModel(_clip_text_config(768, 12, 12)),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(
            T5Config(
                vocab_size=32128,
                d_model=4096,
                d_ff=10240,
                d_kv=64,
                num_layers=24,
                num_heads=64,
                feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=32,
            )
        ),
        tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=False,
            axes_dims_rope=(16, 56, 56),
        ),
    )


def sdxl_turbo() -> Any:
    """SDXL-Turbo: the SDXL UNet, CLIP-L and OpenCLIP-bigG encoders, 4-channel VAE."""
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("cpu"):  # schedulers keep host arrays
        scheduler = EulerAncestralDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="trailing",
        )
    return StableDiffusionXLPipeline(
        vae=_vae(4, scaling_factor=0.13025),
        text_encoder=CLIPTextModel(_clip_text_config(768, 12, 12)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(1280, 32, 20, "gelu")),
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(),
        unet=UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        scheduler=scheduler,
    )


def built_on_gpu(factory: Callable[[], Any]) -> Any:
    """Build a pipeline's modules directly on the GPU in bf16 (random weights)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            pipeline = factory()
    finally:
        torch.set_default_dtype(previous)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to("cuda", torch.bfloat16)


def timed(run: Callable[[], Any], rounds: int) -> list[float]:
    """Seconds of each of `rounds` synchronised calls."""
    seconds = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds


def bench(name: str, model_id: str, factory: Callable[[], Any], rounds: int) -> dict[str, Any]:
    """Measure one model through DiffusersGenerator and bare; return the row."""
    from torch.utils.flop_counter import FlopCounterMode

    started = time.perf_counter()
    pipeline = built_on_gpu(factory)
    build_s = time.perf_counter() - started
    generator = DiffusersGenerator(model_id, "cuda", loader=lambda _id, _device: pipeline)
    assert generator.load() is None, generator.describe()
    request = GenerationRequest.of_prompt("a silver robot with a red shield", (1, 2, 3, 4), "1:1")

    def through_generator() -> Any:
        return asyncio.run(generator.generate(request))

    def bare() -> Any:
        return pipeline(**generator.call_arguments(request))

    result = through_generator()  # warm-up (kernels, allocator)
    bare()
    generator_s = timed(through_generator, rounds)
    bare_s = timed(bare, rounds)
    counter = FlopCounterMode(display=False)
    with counter:
        bare()
    flops = counter.get_total_flops()
    latency = statistics.median(generator_s)
    memory_gib = torch.cuda.max_memory_allocated() / 2**30
    row = {
        "model": name,
        "family": generator.describe()["family"],
        "size": f"{result.parameters['width']}x{result.parameters['height']}",
        "steps": result.parameters["num_inference_steps"],
        "images": len(result.images),
        "build_s": build_s,
        "latency_s": latency,
        "bare_s": statistics.median(bare_s),
        "images_per_s": len(result.images) / latency,
        "tflop_per_request": flops / 1e12,
        "achieved_tflops": flops / latency / 1e12,
        "share_of_spec_peak": flops / latency / 1e12 / SPEC_PEAK_TFLOPS,
        "share_of_measured_peak": flops / latency / 1e12 / MEASURED_PEAK_TFLOPS,
        "peak_memory_gib": memory_gib,
    }
    generator.close()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


MODELS = [
    ("FLUX.1-schnell", "black-forest-labs/FLUX.1-schnell", flux_schnell),
    ("SDXL-Turbo", "stabilityai/sdxl-turbo", sdxl_turbo),
]


def measure(rounds: int = 3, only: str | None = None) -> list[Row]:
    """Both real-size models through DiffusersGenerator against the bare pipeline; [] without
    CUDA."""
    if not torch.cuda.is_available():
        return []
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.cuda.get_device_name()
    rows = []
    for name, model_id, factory in MODELS:
        if only is not None and only not in name.lower():
            continue
        figures = bench(name, model_id, factory, rounds)
        rows.append(
            Row(
                f"real-size {name} on {device}: generator vs bare pipeline",
                figures["latency_s"],
                figures["bare_s"],
                "s",
                False,
                f"{figures['images']} images {figures['size']}, {figures['steps']} steps; "
                f"{figures['images_per_s']:.2f} images/s, {figures['achieved_tflops']:.0f} TFLOP/s "
                f"({figures['share_of_spec_peak']:.0%} of spec peak), "
                f"{figures['peak_memory_gib']:.1f} GiB",
            )
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["flux", "sdxl"])
    options = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    print_table(measure(options.rounds, options.only))
