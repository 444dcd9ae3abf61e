"""Load a base model: a built-in one (`tiny`, `tiny-sd2`, `tiny-sdxl`, `toy`), a hub id, a local diffusers folder
or a single-file checkpoint.

The architecture (an `sdlora.archs` spec) and prediction type are detected from what is loaded; only a
single-file SD 2.x checkpoint's ε/v may need `prediction_type` (its weights do not say, formats/checkpoint.py).
Single files load offline: their configs are derived from their tensors.
Importing this module imports neither torch nor diffusers (they load when a model does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sdlora import archs
from sdlora.archs import ArchSpec
from sdlora.errors import SdloraError, cause
from sdlora.formats.file_io import PICKLE_SUFFIXES

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# built-in offline models -> (what they are, for help texts)
BUILTIN_MODELS = {
    "tiny": "SD 1.x module tree at toy widths, random weights (64 px)",
    "tiny-sd2": "SD 2.x (v-prediction) module tree at toy widths, random weights (64 px)",
    "tiny-sdxl": "SDXL module tree at toy widths, random weights (64 px)",
    "tiny-sd3": "SD 3.5 Medium module tree (MMDiT, CLIP-L + bigG + T5) at toy widths, random weights (64 px)",
    "tiny-flux": "FLUX.1-dev module tree (double/single blocks, CLIP-L + T5) at toy widths, random weights (64 px)",
    "toy": "SD 1.x-shaped model pretrained on sdlora's toy world of coloured shapes (32 px)",
}


def builtin_list() -> str:
    """'tiny, tiny-sd2, tiny-sdxl or toy': every built-in model, for messages."""
    names = list(BUILTIN_MODELS)
    return ", ".join(names[:-1]) + " or " + names[-1]


def model_kinds_help(default: str | None = DEFAULT_MODEL) -> str:
    """What --model takes, naming every built-in model with its description (for --help texts)."""
    return (f"base model{f' (default: {default})' if default else ''}: a hub id (owner/name), a local diffusers "
            "folder, a .safetensors checkpoint, or a built-in offline model: "
            + "; ".join(f"'{k}', {v}" for k, v in BUILTIN_MODELS.items()))


OFFLINE_HINT = f"a built-in offline model (--model {builtin_list()})"


@dataclass
class BaseModel:
    """The parts of a diffusion model that training and generation use, by role.

    `modules` holds the networks under their diffusers names ("unet", "text_encoder", "text_encoder_2", "vae"),
    `tokenizers` the tokenizers ("tokenizer", "tokenizer_2"); both are also attributes (`base.unet`). What each
    role is for comes from `spec`.
    """

    name: str  # what the user passed as --model
    spec: ArchSpec
    prediction_type: str  # "epsilon" or "v_prediction"; "flow" for rectified-flow families (SD3, FLUX)
    modules: dict
    tokenizers: dict
    noise_scheduler: object  # the training noise schedule
    scheduler_config: dict = field(default_factory=dict)  # the model's own inference scheduler config
    native_resolution: int = 512
    kept_precision: list = field(default_factory=list)  # text encoders --te-precision left alone (they train)
    # big models loaded piece by piece (sdlora/bigload.py): each component's loader, for reloading a released one;
    # `deferred`: components still on the meta device (configured, no weights) until `materialise`
    loaders: dict = field(default_factory=dict)
    deferred: set = field(default_factory=set)

    def __getattr__(self, name: str):
        # only called for names that are not fields: the roles (base.unet, base.text_encoder_2, base.tokenizer)
        for table in ("modules", "tokenizers"):
            d = self.__dict__.get(table)
            if d is not None and name in d:
                return d[name]
        raise AttributeError(name)

    @property
    def arch(self) -> str:
        return self.spec.id

    @property
    def denoiser(self):
        return self.modules[self.spec.denoiser]

    @property
    def components(self) -> dict:
        """The modules that LoRA adapts, by kohya component name: unet + te, or unet + te1 + te2 for SDXL."""
        return {c: self.modules[attr] for c, attr in self.spec.components.items()}

    @property
    def text_encoders(self) -> dict:
        """{kohya component: (tokenizer, text encoder)}, in the spec's order."""
        return {t.component: (self.tokenizers[t.tokenizer_attr], self.modules[t.attr]) for t in self.spec.text_encoders}

    @property
    def variant(self) -> str:
        """Key of the spec's `versions`: the prediction type, or the DiT variant its config shows ("dev", "5-large")."""
        return self.spec.variant(self.denoiser.config, self.prediction_type)

    @property
    def base_model_version(self) -> str:
        return self.spec.kohya_version(self.variant)

    @property
    def modelspec_architecture(self) -> str:
        return self.spec.modelspec_architecture(self.base_model_version, self.variant)

    def materialise(self) -> None:
        """Load the deferred components (the denoiser, once the prompts are encoded and T5 has left memory)."""
        for attr in sorted(self.deferred):
            self.modules[attr] = self.loaders[attr]()
        self.deferred = set()

    def to(self, dtype) -> "BaseModel":
        for m in self.modules.values():
            m.to(dtype)
        return self

    def generation_kwargs(self) -> dict:
        """Pipeline-call arguments that keep generation conditioned as training is: T5's prompt length (SD3/FLUX).
        (The prompt itself, with the run's clip skip and chunks: `sdlora.infer.text.prompt_args`.)"""
        for t in self.spec.text_encoders:
            if t.sequence_join:
                tok = self.tokenizers[t.tokenizer_attr]
                return {"max_sequence_length": min(t.max_length or tok.model_max_length, tok.model_max_length)}
        return {}

    def pipeline(self, scheduler=None):
        """A diffusers pipeline over these very modules (no copy)."""
        import diffusers

        if scheduler is None:
            scheduler = getattr(diffusers, self.spec.sampler).from_config(self.noise_scheduler.config)
        cls = getattr(diffusers, self.spec.pipeline)
        return cls(**self.modules, **self.tokenizers, scheduler=scheduler, **self.spec.pipeline_extra)


def from_components(name: str, spec: ArchSpec, parts: dict, native_resolution: int | None = None) -> BaseModel:
    """A BaseModel from a dict of diffusers components (modules, tokenizers, `scheduler` or `noise_scheduler`)."""
    import diffusers

    sched_cfg = dict(parts.get("scheduler_config") or parts["scheduler"].config)
    sched_cfg = {k: v for k, v in sched_cfg.items() if not k.startswith("_")}
    # Training needs the model's noise schedule (betas, prediction type) with DDPM's forward process; flow
    # families their flow-matching schedule (shift) as the spec says.
    noise_scheduler = parts.get("noise_scheduler") or getattr(diffusers, spec.scheduler).from_config(sched_cfg)
    prediction = getattr(noise_scheduler.config, "prediction_type", None) or spec.objective
    modules = {a: parts[a] for a in ("vae", *spec.components.values())}
    tokenizers = {t.tokenizer_attr: parts[t.tokenizer_attr] for t in spec.text_encoders}
    return BaseModel(name=name, spec=spec, prediction_type=prediction, modules=modules, tokenizers=tokenizers,
                     noise_scheduler=noise_scheduler, scheduler_config=sched_cfg,
                     native_resolution=native_resolution or spec.resolution_for(prediction))


def model_identity(name: str) -> tuple[str, str | None]:
    """What A1111 writes as `Model:` and `Model hash:` for `name` (what the user passed as --model), never a local path.

    A single-file checkpoint: its file stem (A1111's `name_for_extra`, e.g. v1-5-pruned-emaonly) and the first 10
    hex digits of the sha256 of the whole file (A1111's `shorthash`, modules/sd_models.py), so A1111, civitai and
    other readers match it to the same file. A diffusers folder or hub id: its last path component and no hash
    (A1111 has no hash for a folder; a hash of its weight files would match nothing any other tool computes, so
    none is written). A built-in model: its name, no hash. Reads the whole file: call it once per model load."""
    import hashlib

    if name in BUILTIN_MODELS:
        return name, None
    path = Path(name).expanduser()
    if path.suffix.lower() == ".safetensors" and path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return path.stem, h.hexdigest()[:10]
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or name, None


def checkpoint_keys(path: Path) -> list[str]:
    """Tensor names of a .safetensors file (safetensors reads the header alone)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise SdloraError(f"{path}: not a readable .safetensors file ({cause(e)}); re-download or re-export "
                          "it") from e


def detect_checkpoint_arch(keys: list[str]) -> ArchSpec:
    """Family of an original-layout (LDM/SGM) single-file checkpoint, from its tensor names."""
    for spec in archs.SPECS.values():
        if spec.checkpoint_marker and any(k.startswith(spec.checkpoint_marker) for k in keys):
            return spec
    for spec in archs.SPECS.values():  # SD3 / FLUX files: the transformer's blocks, with or without a prefix
        if spec.denoiser_names == "original" and any(spec.checkpoint_marker in k for k in keys):
            return spec
    raise SdloraError("the checkpoint has no text-encoder weights of " + ", ".join(archs.label(a) for a in archs.IDS)
                      + "; pass a Stable Diffusion checkpoint (an SDXL refiner or inpainting-only file is not "
                      "supported)")


def model_arch(name: str) -> str | None:
    """The family of model `name` without loading it: a built-in model, a single-file checkpoint (its header), a
    local diffusers folder (model_index.json and the text encoder's config, as `detect_arch` decides); None when
    only loading would tell (a hub id, an unreadable folder)."""
    if name in BUILTIN_MODELS:
        from sdlora.tiny import TINY_MODELS
        from sdlora.toy import TOY_ARCH

        return TINY_MODELS.get(name, TOY_ARCH)
    path = Path(name).expanduser()
    try:
        if path.suffix.lower() == ".safetensors" and path.is_file():
            return detect_checkpoint_arch(checkpoint_keys(path)).id
        if not (path / "model_index.json").is_file():
            return None
        pipeline = json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
        fits = [spec for spec in archs.SPECS.values() if spec.pipeline == pipeline]
        if len(fits) > 1:  # SD 1.x and 2.x share a pipeline: the text encoder's activation tells them apart
            te = json.loads((path / fits[0].text_encoders[0].attr / "config.json").read_text(encoding="utf-8"))
            fits = [s for s in fits if archs.load_config(s.id, s.text_encoders[0].attr).get("hidden_act")
                    == te.get("hidden_act")]
        return fits[0].id if len(fits) == 1 else None
    except (OSError, ValueError, SdloraError):  # loading it says what is wrong, in its own words
        return None


def detect_arch(pipe) -> ArchSpec:
    """Family of a loaded diffusers pipeline: the spec with its pipeline class whose public configs agree on the
    denoiser's added embedding and the first text encoder's activation (widths differ between fine-tunes and the
    tiny models, these do not)."""
    for spec in archs.SPECS.values():
        if type(pipe).__name__ != spec.pipeline:
            continue
        ref_den = archs.load_config(spec.id, spec.denoiser)
        ref_te = archs.load_config(spec.id, spec.text_encoders[0].attr)
        den = getattr(pipe, spec.denoiser).config
        te = getattr(pipe, spec.text_encoders[0].attr).config
        if (getattr(den, "addition_embed_type", None) == ref_den.get("addition_embed_type")
                and getattr(te, "hidden_act", None) == ref_te.get("hidden_act")):
            return spec
    raise SdloraError(f"the model is a {type(pipe).__name__}, not one of "
                      + ", ".join(archs.label(a) for a in archs.IDS) + "; sdlora cannot train it")


def load_base(name: str = DEFAULT_MODEL, dtype=None, prediction_type: str | None = None, precision=None,
              options=None) -> BaseModel:
    """Load `name`: a built-in model, a hub id, a local diffusers folder, or a single-file .safetensors checkpoint.

    `prediction_type` ("epsilon" / "v_prediction") overrides what a single-file checkpoint's guess would be (the
    weights do not say; see sdlora/formats/checkpoint.py); other models carry it in their scheduler config.
    `precision` (a `sdlora.quant.Precision`): the frozen modules stored at --base-precision / --te-precision once
    loaded, module by module (`BaseModel.kept_precision`: text encoders left alone because they train).
    `options` (a `bigload.LoadOptions`): precisions, separate part files and T5's length for SD3/FLUX files and
    folders, which load piece by piece (sdlora/bigload.py) and are stored at their precision block by block."""
    base = _load(name, dtype, prediction_type, options)
    if precision is not None and precision.any and not base.loaders:
        from sdlora import quant

        base.kept_precision = quant.apply(base, precision)
    return base


def _load(name: str, dtype, prediction_type: str | None, options) -> BaseModel:
    import torch

    if name in BUILTIN_MODELS:
        base = _builtin(name)
        return base.to(dtype) if dtype not in (None, torch.float32) else base
    dtype = dtype or torch.float32
    path = Path(name).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SdloraError(f"{name}: pickle checkpoints can run code when loaded; convert it to .safetensors first")
    import diffusers

    if path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise SdloraError(f"{name}: no such file; pass an existing .safetensors checkpoint, a diffusers folder, "
                              f"a hub id, or {OFFLINE_HINT}")
        keys = checkpoint_keys(path)
        spec = detect_checkpoint_arch(keys)
        if spec.denoiser_names == "original":  # FLUX.1 / SD 3.5 as BFL and SAI ship them, parts beside
            from sdlora import bigload
            from sdlora.formats.bigfiles import denoiser_family

            opts = options or bigload.LoadOptions()
            spec, comps = bigload.file_components(path, *denoiser_family(keys), opts)
            return _big(name, spec, comps, opts, None)
        from sdlora.formats.checkpoint import load_single_file

        # configs derived from the file's tensors, tokenizers shipped with sdlora: no network (formats/checkpoint.py)
        parts, native = load_single_file(path, spec, dtype, prediction_type)
        return from_components(name, spec, parts, native)
    else:
        if path.exists() and not (path / "model_index.json").is_file():
            raise SdloraError(f"{name}: the folder has no model_index.json, so it is not a diffusers model; pass a "
                              f"diffusers model folder, a .safetensors checkpoint or a hub id, or {OFFLINE_HINT}")
        if not path.exists():
            _check_hub_id(name)
        elif (dit := _dit_folder(path)) is not None:  # SD3/FLUX folders load piece by piece (sdlora/bigload.py)
            from sdlora import bigload

            opts = options or bigload.LoadOptions()
            return _big(name, dit, bigload.folder_components(path, dit, opts), opts, path)
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(str(path) if path.exists() else name, dtype=dtype,
                                                               safety_checker=None, requires_safety_checker=False)
        except Exception as e:
            raise _load_error(name, path.exists(), e) from e
    return from_pipeline(pipe, name, prediction_type)


def _big(name: str, spec: ArchSpec, comps: dict, opts, folder: Path | None) -> BaseModel:
    """The BaseModel of a model loaded piece by piece (sdlora/bigload.py), with each component's loader (for
    reloading a released one) and its denoiser deferred when `opts` says."""
    from sdlora import bigload

    spec, parts = bigload.load(name, spec, comps, opts, folder)
    base = from_components(name, spec, parts)
    base.loaders = {attr: c.build for attr, c in comps.items()}
    if opts.defer_denoiser:
        base.deferred = {spec.denoiser}
    return base


def _dit_folder(path: Path) -> ArchSpec | None:
    """The DiT family (SD3, FLUX) of a diffusers folder, from its pipeline class; None for the others."""
    import json

    try:
        cls = json.loads((path / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        return None
    return next((s for s in archs.SPECS.values() if s.denoiser_names == "original" and s.pipeline == cls), None)


def _builtin(name: str) -> BaseModel:
    if name == "toy":  # pretrained on a synthetic world (sdlora/toy); SD1-shaped, 32 px
        from sdlora.toy import TOY_ARCH, TOY_RESOLUTION, toy_components

        return from_components(name, archs.get(TOY_ARCH), toy_components(), TOY_RESOLUTION)
    from sdlora.tiny import TINY_MODELS, TINY_RESOLUTION, tiny_components

    spec = archs.get(TINY_MODELS[name])
    return from_components(name, spec, tiny_components(spec), TINY_RESOLUTION)


def from_pipeline(pipe, name: str, prediction_type: str | None = None) -> BaseModel:
    """Wrap a loaded diffusers pipeline, detecting the family and prediction type (unless `prediction_type`)."""
    parts = dict(pipe.components)
    if prediction_type:
        parts["scheduler_config"] = dict(pipe.scheduler.config) | {"prediction_type": prediction_type}
    spec = detect_arch(pipe)
    return from_components(name, spec, parts, _native_size(getattr(pipe, spec.denoiser).config, pipe.vae.config))


def _native_size(denoiser_cfg, vae_cfg) -> int | None:
    """The size a diffusers model was made for, from its own configs (the denoiser's latent `sample_size` times
    the VAE's downsampling), so a merged built-in model (toy: 32 px) generates at its size; None where the denoiser
    does not say (FLUX.1): the family's."""
    latent = getattr(denoiser_cfg, "sample_size", None)
    blocks = getattr(vae_cfg, "block_out_channels", None)
    return latent * 2 ** (len(blocks) - 1) if isinstance(latent, int) and blocks else None


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def _check_hub_id(name: str) -> None:
    """Refuse, before any network access, a name that is neither a built-in model nor a hub id (owner/name)."""
    import difflib

    if _looks_like_path(name):
        raise SdloraError(f"{name}: no such folder or file; pass an existing diffusers folder or .safetensors "
                          f"checkpoint, a hub id (owner/name), or {OFFLINE_HINT}")
    if "/" not in name:
        close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=1)
        guess = f"did you mean '{close[0]}'? " if close else ""
        raise SdloraError(f"'{name}' is not a built-in model, an existing folder or file, or a hub id (owner/name); "
                          f"{guess}built-in models: {builtin_list()}; or pass a diffusers folder, a .safetensors "
                          f"checkpoint or a hub id such as {DEFAULT_MODEL}")


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _unreachable(e: BaseException) -> bool:
    """Whether loading failed because the hub could not be reached (offline, HF_HUB_OFFLINE, DNS, proxy)."""
    markers = ("not fully cached locally", "outgoing traffic has been disabled", "couldn't connect",
               "connection error", "failed to resolve", "name or service not known", "max retries exceeded",
               "offline mode", "cannot reach", "temporary failure in name resolution")
    for x in _chain(e):
        if type(x).__name__ in ("ConnectionError", "ConnectTimeout", "ReadTimeout", "OfflineModeIsEnabled",
                                "LocalEntryNotFoundError", "ConnectError"):
            return True
        if any(m in str(x).lower() for m in markers):
            return True
    return False


def _load_error(name: str, local: bool, e: BaseException) -> SdloraError:
    """One line for a failed `from_pretrained`: the cause first (hub unreachable, no such repo, gated), then the fix."""
    kinds = {type(x).__name__ for x in _chain(e)}
    if local:
        return SdloraError(f"{name}: could not load the diffusers folder ({cause(e)}); check that it is complete "
                           f"(model_index.json and every component folder), or pass {OFFLINE_HINT}")
    if "GatedRepoError" in kinds:
        return SdloraError(f"{name}: the model is gated on the Hugging Face hub; accept its license on "
                           f"huggingface.co and log in with `hf auth login`, or pass {OFFLINE_HINT}")
    if _unreachable(e):
        return SdloraError(f"{name}: the Hugging Face hub cannot be reached and the model is not in the local cache; "
                           "connect once to download it (it is cached for later), or pass a local diffusers folder, a "
                           f".safetensors checkpoint or {OFFLINE_HINT}")
    if "RepositoryNotFoundError" in kinds or "is not a valid model identifier" in str(e) or "404" in str(e):
        return SdloraError(f"{name}: the Hugging Face hub has no such model (or it is private); check the id "
                           f"(owner/name, e.g. {DEFAULT_MODEL}), log in with `hf auth login` for a private one, "
                           f"or pass {OFFLINE_HINT}")
    return SdloraError(f"{name}: could not load the model ({cause(e)}); pass a local diffusers folder, a "
                       f".safetensors checkpoint or {OFFLINE_HINT}")
