"""sdlora: Stable Diffusion LoRA training whose files just work in ComfyUI, AUTOMATIC1111, kohya and diffusers."""

__version__ = "0.1.0"
