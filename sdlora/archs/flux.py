"""FLUX.1 (dev, schnell): 19 double-stream and 38 single-stream transformer blocks; T5-XXL's tokens condition the
transformer, CLIP-L's pooled output its modulation; dev also takes a distilled guidance value. Rectified flow with
a resolution-dependent timestep shift; latents enter as 2x2 patches (packed tokens) with position ids. kohya names
the transformer's modules by BFL's paths (`double_blocks_{i}_img_attn_qkv`, `single_blocks_{i}_linear1`: fused
q, k, v (+ MLP in); sdlora/formats/dit.py)."""

from sdlora.archs.spec import ArchSpec, TextEncoderSpec


def _variant(cfg: dict) -> str:
    return "dev" if cfg.get("guidance_embeds") else "schnell"


def _swap_split(n: int) -> tuple[int, int]:
    """kohya's meaning of `--blocks_to_swap N` for FLUX.1 (flux_models.py `enable_block_swap`): N // 2 double blocks
    and twice the rest in single blocks (a double block holds about 2.4x a single block's weights), so that the
    numbers in kohya's FLUX guide (16 at 12 GB, 28 at 8 GB) mean the same here."""
    return n // 2, (n - n // 2) * 2


SPEC = ArchSpec(
    id="flux", label="FLUX.1", config_dir="flux1",
    text_encoders=(
        TextEncoderSpec("te1", "text_encoder", "tokenizer", "text_encoders.clip_l.transformer.", "clip",
                        hidden=None, pooled=True, pooled_from="pooler_output"),
        # kohya and ComfyUI call FLUX's T5 `lora_te3_` (ComfyUI also reads OneTrainer's `lora_te2_`)
        TextEncoderSpec("te3", "text_encoder_2", "tokenizer_2", "text_encoders.t5xxl.transformer.", "t5",
                        kind="t5", max_length=512, sequence_join=True),
    ),
    pipeline="FluxPipeline", native_resolution=1024, denoiser="transformer",
    denoiser_names="original", a1111=False,
    objective="flow", scheduler="FlowMatchEulerDiscreteScheduler", sampler="FlowMatchEulerDiscreteScheduler",
    packed_latents=True, train_guidance=1.0, sample_guidance=3.5, class_guidance=3.5, negative_prompt=False,
    preset_columns=("transformer", "transformer_te"), network_kinds=("lora",), variant_of=_variant,
    kohya_network_module="networks.lora_flux",  # kohya sd-scripts' flux_train_network.py
    swap_blocks=("transformer_blocks", "single_transformer_blocks"), swap_split=_swap_split,
    checkpoint_marker="double_blocks.0.img_attn.qkv.",  # any prefix (models.detect_checkpoint_arch)
    versions={"dev": ("flux1", "flux-1-dev/lora"), "schnell": ("flux1", "flux-1-schnell/lora")},
    kohya_version_prefix="flux1", modelspec_prefix="flux-1",
    modelspec_implementation="https://github.com/black-forest-labs/flux",
    # FLUX.1-dev's tree (19 double + 38 single blocks, guidance embedder) at toy widths: 2 heads of 16
    tiny_denoiser={"attention_head_dim": 16, "num_attention_heads": 2, "axes_dims_rope": [4, 6, 6],
                   "joint_attention_dim": 32, "pooled_projection_dim": 32},
)
