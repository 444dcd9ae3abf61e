"""SDXL: CLIP ViT-L and OpenCLIP bigG side by side (penultimate layers), bigG's pooled output and size/crop
micro-conditioning; kohya names UNet modules by their SGM (LDM) paths."""

from sdlora.archs.spec import ArchSpec, TextEncoderSpec

SPEC = ArchSpec(
    id="sdxl", label="SDXL", config_dir="sdxl",
    text_encoders=(
        TextEncoderSpec("te1", "text_encoder", "tokenizer", "conditioner.embedders.0.transformer.", "clip",
                        a1111_prefix="0_", hidden="penultimate"),
        TextEncoderSpec("te2", "text_encoder_2", "tokenizer_2", "conditioner.embedders.1.model.", "openclip",
                        a1111_prefix="1_", hidden="penultimate", pooled=True, pad_token="!"),
    ),
    pipeline="StableDiffusionXLPipeline", native_resolution=1024, denoiser_names="ldm", micro_conditioning=True,
    checkpoint_marker="conditioner.embedders.1.",
    versions={"epsilon": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")}, kohya_version_prefix="sdxl",
    modelspec_prefix="stable-diffusion-xl",
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    # cross-attention sees both encoders' hidden states side by side (32 + 32); the added embedding is the
    # pooled bigG output (32) plus six size/crop numbers embedded at 8 each
    tiny_denoiser={"norm_num_groups": 8, "block_out_channels": [16, 32, 64], "attention_head_dim": [2, 4, 4],
                   "cross_attention_dim": 64, "addition_time_embed_dim": 8,
                   "projection_class_embeddings_input_dim": 6 * 8 + 32},
)
