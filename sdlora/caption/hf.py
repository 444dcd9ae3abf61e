"""Loading a transformers captioning model and its processor from a hub id or a local folder (the same call for
both, `from_pretrained`), with one-line errors for a model that cannot be had."""

from __future__ import annotations

from sdlora.errors import SdloraError, cause


def load_pretrained(model_class: str, model: str, device: str | None, what: str, default: str):
    """(processor, model in eval mode, device) for the transformers class named `model_class`; `device` None: a GPU
    when there is one."""
    import torch
    import transformers

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    cls = getattr(transformers, model_class, None)
    if cls is None:
        raise SdloraError(f"the {what} captioner needs a transformers with {model_class} (this one is "
                          f"{transformers.__version__}); pip install -U 'transformers>=5.24'")
    try:
        processor = transformers.AutoProcessor.from_pretrained(model)
        net = cls.from_pretrained(model)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:  # no such repo or folder, not this kind
        raise SdloraError(f"--captioner-model {model}: cannot load it as a {what} model ({cause(e)}); pass a hub id "
                          f"such as {default} or a local folder holding a {what} model and its processor") from e
    return processor, net.to(device).eval(), device


def new_tokens(net, wanted: int) -> int:
    """`wanted` new tokens, at most what the text decoder has positions for (a longer generation would index past
    its position table)."""
    limit = getattr(getattr(net.config, "text_config", net.config), "max_position_embeddings", None)
    return min(wanted, limit - 2) if limit else wanted
