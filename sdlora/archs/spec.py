"""What differs between model families, as data: one `ArchSpec` per family (sd1.py, sd2.py, sdxl.py).

Code elsewhere asks the spec (`sdlora.archs.get(arch)`) instead of comparing architecture names. Adding a
family means a new spec module registered in `sdlora/archs/__init__.py`, its public configs in a folder beside
it, its key-name maps in `sdlora/formats/`, and tests; nothing else compares family names.

Importing this module imports neither torch nor diffusers (the CLI's --help must stay fast).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

DENOISER = "unet"  # the kohya component of every family's denoiser (`lora_unet_...`, a UNet or a transformer)


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family, by role."""

    component: str  # sdlora/kohya component name: "te" (the only one), "te1", "te2", "te3" (T5-XXL)
    attr: str  # diffusers pipeline attribute and config file name: "text_encoder", "text_encoder_2"
    tokenizer_attr: str  # "tokenizer", "tokenizer_2"
    ldm_prefix: str  # where its weights live in an original (LDM/SGM) single-file checkpoint
    ldm_layout: str  # "clip" (HF CLIP names under `transformer.`) or "openclip" (OpenCLIP `resblocks`, fused qkv)
    a1111_prefix: str = ""  # A1111's network-layer name prefix of this encoder ("", "0_", "1_")
    hidden: str | None = "final"  # conditioning from the "final" (after the final layer norm) or "penultimate"
    # layer; None: only its pooled output is used (FLUX's CLIP-L)
    pooled: bool = False  # its pooled output conditions the denoiser (SDXL's bigG; SD3's CLIP-L and bigG;
    # FLUX's CLIP-L)
    pooled_from: str = "text_embeds"  # which output is pooled: the projected "text_embeds" or the "pooler_output"
    kind: str = "clip"  # "clip" (LoRA-trainable; kohya names it `..._text_model_...`) or "t5" (frozen, cached)
    max_length: int | None = None  # tokens per prompt when not the tokenizer's own limit (T5: 256 for SD3, 512 FLUX)
    sequence_join: bool = False  # its hidden states follow the others' along the sequence, which are zero-padded to
    # its width first (SD3: [CLIP-L | bigG | 0] then T5 tokens); otherwise encoders go side by side on features
    pad_token: str = "<|endoftext|>"  # its tokenizer's padding token (OpenCLIP's is "!")
    head_channels: int = 64  # channels per attention head (not in the weights; CLIP-L, OpenCLIP-H and bigG: 64)
    ldm_extra_layer: bool = False  # original files hold one more layer than diffusers' encoder (SD 2.x: OpenCLIP-H's
    # 24th, which the penultimate-layer conditioning never runs)
    # set per run (sdlora/train/long_prompts.py): --clip-skip N (None: the `hidden` layer) and --max-token-length's
    # 75-token chunks per prompt (1: one 77-token sequence)
    clip_skip: int | None = None
    chunks: int = 1


@dataclass(frozen=True)
class ArchSpec:
    """A model family: its components, conditioning, objective, latent scaling, names and metadata values."""

    id: str  # "sd1", "sd2", "sdxl": what BaseModel.arch and adapter files are tagged with
    label: str  # "SD 1.x": what messages call it
    config_dir: str  # folder of the public diffusers configs beside this file
    text_encoders: tuple[TextEncoderSpec, ...]
    pipeline: str  # diffusers pipeline class for generation
    native_resolution: int  # what the base model was trained at (per prediction type: `resolution_for`)
    denoiser: str = "unet"  # component name (and pipeline attribute) of the denoiser
    denoiser_names: str = "diffusers"  # kohya names denoiser modules by their "diffusers" path, "ldm" path, or the
    # "original" model's module path with q/k/v fused (SD 3.x: SAI's MMDiT; FLUX.1: BFL's; sdlora/formats/dit.py)
    a1111: bool = True  # AUTOMATIC1111 runs this family (not SD 3.x / FLUX.1: ComfyUI and Forge do)
    micro_conditioning: bool = False  # SDXL: original size, crop and target size condition the denoiser
    objective: str = "diffusion"  # "diffusion" (epsilon / v from the scheduler config) or "flow" (rectified flow)
    scheduler: str = "DDPMScheduler"  # diffusers class of the training noise schedule (built from its config)
    sampler: str = "DPMSolverMultistepScheduler"  # diffusers scheduler sample grids and `generate` use by default
    packed_latents: bool = False  # FLUX: the transformer sees 2x2 latent patches as tokens, with position ids
    train_guidance: float = 1.0  # guidance-distilled models (FLUX.1-dev): the guidance input during training
    sample_guidance: float = 7.0  # classifier-free (or distilled) guidance scale of generation by default
    class_guidance: float = 7.5  # the guidance class images for prior preservation are generated with
    negative_prompt: bool = True  # the pipeline takes a negative prompt (FLUX.1's does not)
    preset_columns: tuple[str, str] = ("unet", "te")  # which columns of lora.targets.PRESETS this family uses
    network_kinds: tuple[str, ...] | None = None  # adapter kinds it can train (None: all; fused qkv: LoRA only)
    variant_of: Callable[[dict], str] | None = None  # denoiser config -> key of `versions` (DiT families)
    pipeline_extra: dict = field(default_factory=dict)  # constructor arguments the pipeline needs beyond modules
    checkpoint_marker: str = ""  # a tensor-name prefix only this family's single-file checkpoints have
    epsilon_resolution: int | None = None  # native resolution of epsilon-prediction variants (SD 2.x base: 512)
    # metadata values (the keys are written by sdlora/formats/meta.py)
    # prediction type -> (kohya's `ss_base_model_version`, SAI `modelspec.architecture` as kohya writes it)
    versions: dict = field(default_factory=dict)
    kohya_version_prefix: str | tuple[str, ...] = ""  # every `ss_base_model_version` of this family starts with it
    modelspec_prefix: str = ""  # every `modelspec.architecture` of this family starts with it
    modelspec_implementation: str = "diffusers"
    is_v2: bool = False  # kohya's `ss_v2`
    diffusers_kohya_reader: bool = True  # diffusers' load_lora_weights reads a kohya file of this family as written
    # (SD 3.x: no, it applies only the `sdlora convert --to diffusers` form)
    kohya_network_module: str = "networks.lora"  # kohya's `ss_network_module` of a plain LoRA of this family
    # attention heads of the denoiser's transformer blocks, which the weights do not show (ComfyUI's model
    # detection uses the same rules): a fixed count per block (SD 1.x: 8), else one head per `unet_head_channels`
    unet_heads: int = 0
    unet_head_channels: int = 64
    ambiguous_prediction: bool = False  # ε and v variants have the same weights layout (SD 2.x): the loader guesses
    tiny_denoiser: dict = field(default_factory=dict)  # denoiser config overrides of the built-in tiny model
    # (sdlora.tiny)
    # block swap (sdlora/train/swap.py): the denoiser's ModuleLists whose blocks `--blocks-to-swap N` may keep in
    # host memory, in execution order, and how N splits over them (None: N blocks of the one list). Empty: the
    # family has no block swap.
    swap_blocks: tuple[str, ...] = ()
    swap_split: Callable[[int], tuple[int, ...]] | None = None

    @property
    def components(self) -> dict[str, str]:
        """kohya component -> diffusers component (pipeline attribute / config file)."""
        return {DENOISER: self.denoiser} | {t.component: t.attr for t in self.text_encoders}

    @property
    def te_components(self) -> tuple[str, ...]:
        return tuple(t.component for t in self.text_encoders)

    def clip_hidden(self) -> tuple[TextEncoderSpec, ...]:
        """The CLIP encoders whose hidden states condition the denoiser: what --clip-skip and --max-token-length's
        chunks act on (none in FLUX.1, whose CLIP-L gives only its pooled output)."""
        return tuple(t for t in self.text_encoders if t.kind == "clip" and t.hidden is not None)

    def pipeline_clip_skip(self, n: int | None = None) -> int | None:
        """diffusers pipelines' `clip_skip` for A1111/kohya's clip skip `n` (default: the one set on this spec's text
        encoders for a run): the pipelines count layers skipped beyond the family's own (SD 1.x/2.x: the last layer,
        hidden_states[-(k + 1)] then the final layer norm; SDXL, SD 3.x: the penultimate, hidden_states[-(k + 2)]).
        None for the family's own layer."""
        clips = self.clip_hidden()
        if n is None:
            n = next((t.clip_skip for t in clips if t.clip_skip), None)
        if n is None or not clips:
            return None
        k = n - (2 if clips[0].hidden == "penultimate" else 1)
        return k or None

    @property
    def trainable_te_components(self) -> tuple[str, ...]:
        """Text encoders LoRA may train (CLIP; T5-XXL stays frozen and cached)."""
        return tuple(t.component for t in self.text_encoders if t.kind == "clip")

    def variant(self, denoiser_config: dict, prediction_type: str) -> str:
        """Key of `versions` for a base model: its prediction type, or what its denoiser config says (DiT)."""
        return self.variant_of(dict(denoiser_config)) if self.variant_of else prediction_type

    def text_encoder(self, component: str) -> TextEncoderSpec:
        return next(t for t in self.text_encoders if t.component == component)

    def resolution_for(self, prediction_type: str) -> int:
        if prediction_type == "epsilon" and self.epsilon_resolution:
            return self.epsilon_resolution
        return self.native_resolution

    def kohya_version(self, prediction_type: str) -> str:
        """`ss_base_model_version` of a base model of this family with this prediction type."""
        return (self.versions.get(prediction_type) or next(iter(self.versions.values())))[0]

    def modelspec_architecture(self, kohya_version: str, variant: str | None = None) -> str:
        """`modelspec.architecture` of a LoRA for the base model whose `ss_base_model_version` is `kohya_version`
        (`variant`, a key of `versions`, decides where versions share a value: FLUX.1-dev and -schnell)."""
        if variant in self.versions:
            return self.versions[variant][1]
        return next(ms for v, ms in self.versions.values() if v == kohya_version)
