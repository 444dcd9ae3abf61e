"""Stable Diffusion 2.x: one OpenCLIP ViT-H text encoder; 768 px v-prediction, or 512 px epsilon (base)."""

from sdlora.archs.sd1 import SD_PIPELINE_EXTRA
from sdlora.archs.spec import ArchSpec, TextEncoderSpec

SPEC = ArchSpec(
    id="sd2", label="SD 2.x", config_dir="sd21",
    text_encoders=(TextEncoderSpec("te", "text_encoder", "tokenizer", "cond_stage_model.model.", "openclip",
                                   pad_token="!", ldm_extra_layer=True),),
    pipeline="StableDiffusionPipeline", pipeline_extra=SD_PIPELINE_EXTRA, native_resolution=768,
    epsilon_resolution=512, checkpoint_marker="cond_stage_model.model.transformer.",
    versions={"v_prediction": ("sd_v2_768_v", "stable-diffusion-v2-768-v/lora"),
              "epsilon": ("sd_v2_512", "stable-diffusion-v2-512/lora")},
    kohya_version_prefix="sd_v2",
    modelspec_prefix="stable-diffusion-v2", is_v2=True, ambiguous_prediction=True,
    tiny_denoiser={"norm_num_groups": 8, "block_out_channels": [16, 32, 64, 64], "attention_head_dim": [2, 2, 4, 4],
                   "cross_attention_dim": 32},
)
