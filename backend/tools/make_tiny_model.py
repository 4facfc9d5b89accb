"""Build a tiny random-weight diffusers pipeline on disk, so the server runs with no GPU or weights.

    cd backend && python -m tools.make_tiny_model mv/models/tiny-flux2-klein     # FLUX.2 [klein]
    cd backend && python -m tools.make_tiny_model mv/models/tiny-flux --family flux
    cd backend && python -m tools.make_tiny_model mv/models/tiny-sdxl-turbo --family sdxl

The pipelines keep the real structure where it decides cost and shape: a VAE with four blocks
(the real latent scale factor of 8), the real text encoder and tokenizer classes, and attention
only at the lowest resolution. The images are noise; loading, batching, seeding, sizes,
references, encoding and storage are all real.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path
from typing import Any, Literal

Family = Literal["flux2-klein", "flux", "flux-kontext", "sdxl"]

_TEXT_HIDDEN = 32
_SEED = 0


def _clip_tokenizer(max_length: int = 77) -> Any:
    """A character-level CLIP tokenizer: every printable character is a token."""
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    characters = [c for c in string.printable if not c.isspace()]
    pieces = specials + characters + [f"{c}</w>" for c in characters]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer(max_length: int = 256) -> Any:
    """A character-level T5 tokenizer built from a unigram vocabulary."""
    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581", *string.printable.strip()]
    vocab = [(piece, 0.0 if index < 3 else -1.0) for index, piece in enumerate(pieces)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _clip_text_config(vocab_size: int, **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=_TEXT_HIDDEN,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **extra,
    )


def _vae(latent_channels: int, **extra: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16],
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        # The real VAEs attend in their mid block; at one megapixel that is a 16k-token
        # attention per image, which would dominate a tiny model's cost on a CPU.
        mid_block_add_attention=False,
        **extra,
    )


def build_flux(path: Path, kontext: bool = False) -> Path:
    """A tiny FluxPipeline (schnell-style: no guidance embedding) saved at `path`; with
    `kontext`, a FluxKontextPipeline (guidance-distilled, takes one reference image)."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(_SEED)
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    pipeline = (FluxKontextPipeline if kontext else FluxPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=1.0, use_dynamic_shifting=False, num_train_timesteps=1000
        ),
        vae=_vae(
            16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=CLIPTextModel(_clip_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                d_model=_TEXT_HIDDEN,
                d_ff=37,
                d_kv=8,
                num_layers=1,
                num_heads=4,
                decoder_start_token_id=0,
            )
        ),
        tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_TEXT_HIDDEN,
            pooled_projection_dim=_TEXT_HIDDEN,
            guidance_embeds=kontext,
            axes_dims_rope=(4, 6, 6),
        ),
    )
    pipeline.save_pretrained(path)
    return path


def _byte_level_qwen_tokenizer() -> Any:
    """A Qwen2 tokenizer whose tokens are the 256 bytes, with the chat template FLUX.2 uses."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {
        piece: index for index, piece in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))
    }
    vocab.update({special: len(vocab) + index for index, special in enumerate(specials)})
    model = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=model,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


# With diffusers' default initialisation a tiny FLUX.2 transformer barely listens to its
# conditioning: another reference image moves the output by a fraction of one uint8 level,
# another prompt by less, so no test could see that either reached the model. Scaling every
# transformer weight by this factor makes both move it by several levels on average, while
# the same inputs still give identical pixels.
KLEIN_TRANSFORMER_SCALE = 4.0


def flux2_scheduler() -> Any:
    """The flow-matching scheduler FLUX.2 [klein] ships with (dynamic, exponential shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


def build_flux2_klein(path: Path) -> Path:
    """A tiny Flux2KleinPipeline (step-distilled, takes reference images) saved at `path`."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(_SEED)
    tokenizer = _byte_level_qwen_tokenizer()
    text_hidden = 16
    # 28 layers, as the real Qwen3 text encoder has: the pipeline reads layers 9, 18 and 27.
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=32,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * text_hidden,  # three hidden-state layers side by side
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.mul_(KLEIN_TRANSFORMER_SCALE)
    pipeline = Flux2KleinPipeline(
        scheduler=flux2_scheduler(),
        vae=AutoencoderKLFlux2(
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            mid_block_add_attention=False,  # as for the FLUX.1 VAE above
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=True,
    )
    pipeline.save_pretrained(path)
    return path


def build_sdxl(path: Path) -> Path:
    """A tiny StableDiffusionXLPipeline (turbo-style scheduler) saved at `path`."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(_SEED)
    tokenizer = _clip_tokenizer()
    pipeline = StableDiffusionXLPipeline(
        vae=_vae(4, scaling_factor=0.13025),
        text_encoder=CLIPTextModel(_clip_text_config(len(tokenizer))),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        tokenizer_2=_clip_tokenizer(),
        unet=UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(8, 16, 32),
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 8),
            norm_num_groups=8,
            cross_attention_dim=2 * _TEXT_HIDDEN,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + _TEXT_HIDDEN,
        ),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="trailing",
        ),
    )
    pipeline.save_pretrained(path)
    return path


BUILDERS = {
    "flux2-klein": build_flux2_klein,
    "flux": build_flux,
    "flux-kontext": lambda path: build_flux(path, kontext=True),
    "sdxl": build_sdxl,
}


def build(path: Path, family: Family = "flux2-klein") -> Path:
    """Build the tiny pipeline of `family` at `path` (replacing nothing that is already there)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    return BUILDERS[family](path)


def main(argv: list[str] | None = None) -> int:
    """Command line: build a tiny pipeline and print where it is."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="directory to write the pipeline into")
    parser.add_argument("--family", choices=sorted(BUILDERS), default="flux2-klein")
    args = parser.parse_args(argv)
    existed = (args.path / "model_index.json").is_file()
    path = build(args.path, args.family).resolve()
    index = json.loads((path / "model_index.json").read_text())
    print(f"{index['_class_name']} {'already in' if existed else 'written to'} {path}")
    print(f"run the server with it:  LOCAL_MODEL_ID={path} LOCAL_DEVICE=cpu make run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
