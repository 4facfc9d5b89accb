"""GPU benchmark: real-size FLUX.2 [klein] 4B, FLUX.1-schnell and SDXL-Turbo architectures with
random weights.

Run on a CUDA machine: `make bench-gpu` (or, from backend/, `python ../bench/gpu_generation.py`).
No weights are downloaded: every component is built from its published configuration with
random bf16 weights (compute does not depend on the weight values), and the tokenizers are the
tiny character-level ones, padded to the real sequence lengths (77 CLIP tokens, 256 T5 tokens
for schnell), so every matrix has its real shape.

Each model runs through DiffusersGenerator (the worker thread, one batched call, one
torch.Generator per image, the family defaults) and as a bare pipeline call:
- FLUX.2 [klein] 4B: 1 and 4 images at 1024x1024, 4 steps, text only and from 1 and 4
  reference images of 1024x1024 (byte-level tokenizer padded to the real 512 tokens);
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

from services.generation.base import GenerationRequest, ReferenceImage  # noqa: E402
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


def flux2_klein_4b() -> Any:
    """FLUX.2 [klein] 4B: 5 double and 20 single blocks (24 heads of 128), Qwen3-4B as the
    text encoder (three of its hidden layers side by side: 7680), the 32-channel FLUX.2 VAE."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tools.make_tiny_model import _byte_level_qwen_tokenizer, flux2_scheduler

    with torch.device("cpu"):  # schedulers keep host arrays
        scheduler = flux2_scheduler()
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=AutoencoderKLFlux2(),  # the defaults are FLUX.2's VAE
        text_encoder=Qwen3ForCausalLM(
            Qwen3Config(
                vocab_size=151936,
                hidden_size=2560,
                intermediate_size=9728,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
                max_position_embeddings=40960,
                tie_word_embeddings=True,
            )
        ),
        # Byte-level, padded to the real 512 tokens: every matrix has its real shape.
        tokenizer=_byte_level_qwen_tokenizer(),
        transformer=Flux2Transformer2DModel(
            patch_size=1,
            in_channels=128,
            num_layers=5,
            num_single_layers=20,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=7680,
            timestep_guidance_channels=256,
            mlp_ratio=3.0,
            axes_dims_rope=(32, 32, 32, 32),
            rope_theta=2000,
            guidance_embeds=False,
        ),
        is_distilled=True,
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


def reference_png(seed: int) -> bytes:
    """A 1024x1024 reference image (noise: its content does not change the compute)."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


PROMPT = "a silver robot with a red shield"
FOUR_IMAGES = {"4 images": GenerationRequest.of_prompt(PROMPT, (1, 2, 3, 4), "1:1")}


def klein_requests() -> dict[str, GenerationRequest]:
    """Text only and with 1 and 4 references, each at batch 1 and 4."""
    references = tuple(ReferenceImage(f"ref-{i}", reference_png(i)) for i in range(4))
    requests = {}
    for label, chosen in (("text only", ()), ("1 reference", references[:1])):
        for batch in (1, 4):
            seeds = tuple(range(1, batch + 1))
            requests[f"{label}, batch {batch}"] = GenerationRequest.of_prompt(
                PROMPT, seeds, "1:1", references=chosen
            )
    for batch in (1, 4):
        seeds = tuple(range(1, batch + 1))
        requests[f"4 references, batch {batch}"] = GenerationRequest.of_prompt(
            PROMPT, seeds, "1:1", references=references
        )
    return requests


def bench(
    name: str,
    model_id: str,
    factory: Callable[[], Any],
    rounds: int,
    requests: dict[str, GenerationRequest] = FOUR_IMAGES,
) -> list[dict[str, Any]]:
    """Measure one model through DiffusersGenerator and bare, once per request; the rows."""
    from torch.utils.flop_counter import FlopCounterMode

    started = time.perf_counter()
    pipeline = built_on_gpu(factory)
    build_s = time.perf_counter() - started
    generator = DiffusersGenerator(model_id, "cuda", loader=lambda _id, _device: pipeline)
    assert generator.load() is None, generator.describe()
    rows = []
    for label, request in requests.items():

        def through_generator(request: GenerationRequest = request) -> Any:
            return asyncio.run(generator.generate(request))

        def bare(request: GenerationRequest = request) -> Any:
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
        rows.append(
            {
                "model": f"{name}, {label}" if requests is not FOUR_IMAGES else name,
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
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
        )
        torch.cuda.reset_peak_memory_stats()
    generator.close()
    torch.cuda.empty_cache()
    return rows


MODELS: list[tuple[str, str, Callable[[], Any], Callable[[], dict[str, GenerationRequest]]]] = [
    ("FLUX.2 [klein] 4B", "black-forest-labs/FLUX.2-klein-4B", flux2_klein_4b, klein_requests),
    ("FLUX.1-schnell", "black-forest-labs/FLUX.1-schnell", flux_schnell, lambda: FOUR_IMAGES),
    ("SDXL-Turbo", "stabilityai/sdxl-turbo", sdxl_turbo, lambda: FOUR_IMAGES),
]


def measure(rounds: int = 3, only: str | None = None) -> list[Row]:
    """The real-size models through DiffusersGenerator against the bare pipeline; [] without
    CUDA."""
    if not torch.cuda.is_available():
        return []
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.cuda.get_device_name()
    rows = []
    for name, model_id, factory, requests in MODELS:
        if only is not None and only not in name.lower():
            continue
        for figures in bench(name, model_id, factory, rounds, requests()):
            rows.append(
                Row(
                    f"real-size {figures['model']} on {device}: generator vs bare pipeline",
                    figures["latency_s"],
                    figures["bare_s"],
                    "s",
                    False,
                    f"{figures['images']} images {figures['size']}, {figures['steps']} steps; "
                    f"{figures['images_per_s']:.2f} images/s, "
                    f"{figures['achieved_tflops']:.0f} TFLOP/s "
                    f"({figures['share_of_spec_peak']:.0%} of spec peak), "
                    f"{figures['peak_memory_gib']:.1f} GiB",
                )
            )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["klein", "flux", "sdxl"])
    options = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    print_table(measure(options.rounds, options.only))
