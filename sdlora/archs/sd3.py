"""Stable Diffusion 3 / 3.5 (MMDiT): CLIP-L and OpenCLIP bigG (penultimate layers, side by side, zero-padded to
T5's width) followed by T5-XXL's tokens; both CLIPs' projected pooled outputs; a rectified-flow objective with a
shifted logit-normal timestep density. kohya names the transformer's modules by SAI's MMDiT paths
(`joint_blocks_{i}_x_block_attn_qkv`: q, k, v fused; sdlora/formats/dit.py)."""

from sdlora.archs.spec import ArchSpec, TextEncoderSpec


def _variant(cfg: dict) -> str:
    """kohya's SD3 `model_type`: dual attention layers -> 3.5 Medium (MMDiT-X), qk-norm -> 3.5 Large, \
else SD3 Medium."""
    if cfg.get("dual_attention_layers"):
        return "5-medium"
    return "5-large" if cfg.get("qk_norm") else "medium"


SPEC = ArchSpec(
    id="sd3", label="SD 3.x", config_dir="sd35",
    text_encoders=(
        TextEncoderSpec("te1", "text_encoder", "tokenizer", "text_encoders.clip_l.transformer.", "clip",
                        hidden="penultimate", pooled=True),
        TextEncoderSpec("te2", "text_encoder_2", "tokenizer_2", "text_encoders.clip_g.transformer.", "clip",
                        hidden="penultimate", pooled=True, pad_token="!"),
        TextEncoderSpec("te3", "text_encoder_3", "tokenizer_3", "text_encoders.t5xxl.transformer.", "t5",
                        kind="t5", max_length=256, sequence_join=True),
    ),
    pipeline="StableDiffusion3Pipeline", native_resolution=1024, denoiser="transformer",
    denoiser_names="original", a1111=False,
    objective="flow", scheduler="FlowMatchEulerDiscreteScheduler", sampler="FlowMatchEulerDiscreteScheduler",
    sample_guidance=7.0, class_guidance=7.0,
    preset_columns=("transformer", "transformer_te"), network_kinds=("lora",), variant_of=_variant,
    kohya_network_module="networks.lora_sd3", diffusers_kohya_reader=False,  # kohya sd-scripts' sd3_train_network.py
    swap_blocks=("transformer_blocks",),  # the joint blocks: --blocks-to-swap N keeps the last N in host memory
    checkpoint_marker="joint_blocks.0.x_block.",  # any prefix (models.detect_checkpoint_arch)
    # kohya's `ss_base_model_version` is the MMDiT model type (these do not start with "sd3"), K sd3_utils.py
    versions={"5-medium": ("5-medium", "stable-diffusion-3-5-medium/lora"),
              "5-large": ("5-large", "stable-diffusion-3-5-large/lora"),
              "medium": ("medium", "stable-diffusion-3-medium/lora")},
    kohya_version_prefix=("5-medium", "5-large", "medium"), modelspec_prefix="stable-diffusion-3",
    modelspec_implementation="https://github.com/Stability-AI/sd3.5",
    # SD 3.5 Medium's tree (24 joint blocks, dual attention in 0-12, qk-norm) at toy widths: 2 heads of 16
    tiny_denoiser={"attention_head_dim": 16, "num_attention_heads": 2, "caption_projection_dim": 32,
                   "joint_attention_dim": 32, "pooled_projection_dim": 64, "pos_embed_max_size": 32},
)
