"""Reading and writing .safetensors: atomic writes, and one-line errors for files that are not what they claim."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

from sdlora.errors import SdloraError, cause

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def atomic_write(path: Path, write) -> Path:
    """Call `write(tmp_path)` on a temp file beside `path`, then rename it over `path`: a crash or an error never
    leaves half a file, and an existing file stays as it was until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def usual_permissions(folder: Path) -> None:
    """mkdtemp makes a private folder, and some writers (safetensors' save_file) private files: everything in an
    output folder gets the usual permissions, 0666/0777 less the umask."""
    umask = _umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def atomic_write_dir(out: Path, fill) -> Path:
    """Call `fill(tmp_folder)` on a temp folder beside `out`, then rename it into place (replacing an old one):
    a crash never leaves half a folder. For folders that are sdlora's own (a checkpoint's step folder); a folder a
    user names goes through `sdlora.guard.write_folder`, which never deletes what sdlora did not write."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill(tmp)
        usual_permissions(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def atomic_save(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """Write `tensors` (torch) with `metadata` to a .safetensors file atomically."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load(path: Path) -> tuple[dict, dict[str, str]]:
    """Tensors and metadata of a .safetensors file; a pickle, truncated or foreign file gives an SdloraError."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SdloraError(f"{path}: pickle files can run code when loaded; sdlora reads .safetensors only "
                          "(convert it with a trusted tool first)")
    if not path.is_file():
        raise SdloraError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        with open(path, "rb") as fh:
            head = fh.read(9)
        # a safetensors header (8-byte length, then JSON "{") whose length's low byte is 0x80 is not a pickle
        if (head[:1] == b"\x80" or head[:2] == b"PK") and head[8:9] != b"{":
            raise SdloraError(f"{path}: this is a pickle file, not .safetensors; convert it with a trusted tool "
                              "first") from e
        raise SdloraError(f"{path}: not a valid .safetensors file ({cause(e)}); "
                          "the file is truncated or corrupt, re-download or re-save it") from e
    return tensors, metadata


def save_png(image, path, text: dict[str, str] | None = None) -> Path:
    """Write a PIL `image` as PNG with `text` chunks, atomically and with the usual permissions."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def png_text(path) -> dict[str, str]:
    """The text chunks of a PNG file."""
    from PIL import Image

    with Image.open(path) as im:
        return {k: v for k, v in im.info.items() if isinstance(v, str)}
