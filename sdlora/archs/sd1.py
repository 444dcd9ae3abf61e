"""Stable Diffusion 1.x: one CLIP ViT-L/14 text encoder, UNet conditioned on its final hidden states."""

from sdlora.archs.spec import ArchSpec, TextEncoderSpec

SD_PIPELINE_EXTRA = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

SPEC = ArchSpec(
    id="sd1", label="SD 1.x", config_dir="sd15",
    text_encoders=(TextEncoderSpec("te", "text_encoder", "tokenizer", "cond_stage_model.transformer.", "clip",
                                   a1111_prefix=""),),
    pipeline="StableDiffusionPipeline", pipeline_extra=SD_PIPELINE_EXTRA, native_resolution=512,
    checkpoint_marker="cond_stage_model.transformer.",
    versions={"epsilon": ("sd_v1", "stable-diffusion-v1/lora"), "v_prediction": ("sd_v1", "stable-diffusion-v1/lora")},
    kohya_version_prefix="sd_v1",
    modelspec_prefix="stable-diffusion-v1", unet_heads=8,
    tiny_denoiser={"norm_num_groups": 8, "block_out_channels": [16, 32, 64, 64], "attention_head_dim": 4,
                   "cross_attention_dim": 32},
)
