"""The adapters app.py lists: the files of its --adapters folder (every visitor sees them) and uploads, which only
the visitor who uploaded them sees.

An upload is read once into memory (the temp file is deleted then), keyed on the sha256 of its bytes: the same
file uploaded again, by anyone, is not read or held twice. Uploads are bounded in size, per visitor and in all;
a visitor's uploads leave memory when the visitor leaves (`forget`, called when the page is closed).
"""

from __future__ import annotations

from pathlib import Path

from sdlora.cache import file_digest
from sdlora.errors import SdloraError
from sdlora.formats.adapter import AdapterFile
from sdlora.formats.read import read_adapter

MAX_UPLOAD_BYTES = 1 << 30  # one upload (an SDXL LoRA at rank 128 is about 900 MB)
MAX_UPLOADS = 32  # uploads one visitor may hold
MAX_HELD = 256  # distinct uploads held in memory for all visitors together
UPLOAD = "upload:"  # key prefix of uploads (folder files are keyed by their path)


class Library:
    """The adapter files the page lists: those in `folder` (scanned again at every model load: new and changed
    files are read, each file once) and each visitor's own uploads. Kept in memory, so they need the files no more
    once read."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.files: dict[str, AdapterFile] = {}  # key (path, or upload:sha256) -> file, in listing order
        self.refused: dict[str, str] = {}  # folder file -> why it could not be read (every visitor sees the folder)
        self.stamps: dict[str, tuple[int, int]] = {}
        self.uploads: dict[str, list[str]] = {}  # visitor -> the upload keys it sees, in upload order
        self.owners: dict[str, set[str]] = {}  # upload key -> visitors holding it

    def scan(self) -> None:
        if self.folder is None or not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*.safetensors")):
            key = str(path.resolve())
            try:
                st = path.stat()
            except OSError:
                continue
            if self.stamps.get(key) == (st.st_mtime_ns, st.st_size):
                continue
            self.stamps[key] = (st.st_mtime_ns, st.st_size)
            try:
                self.files[key] = read_adapter(path)
                self.refused.pop(key, None)
            except SdloraError as e:
                self.files.pop(key, None)
                self.refused[key] = str(e)

    def visible(self, visitor: str) -> list[str]:
        """Keys `visitor` sees: the folder's files, then its own uploads."""
        return [k for k in self.files if not k.startswith(UPLOAD)] + self.uploads.get(visitor, [])

    def upload(self, path, visitor: str, name: str | None = None) -> str | None:
        """Read the uploaded temp file `path` for `visitor` (listed as `name`, default its file name) and delete it;
        the reason when it is refused (too large, too many, not an adapter)."""
        path = Path(path)
        name = name or path.name
        try:
            return self._take(path, visitor, name)
        finally:
            path.unlink(missing_ok=True)  # held in memory now, or refused: the temp file is not needed

    def _take(self, path: Path, visitor: str, name: str) -> str | None:
        if not path.is_file():
            return f"{name}: not a regular file"
        size = path.stat().st_size
        if size > MAX_UPLOAD_BYTES:
            return (f"{name}: {size / 2**20:,.0f} MiB is more than the {MAX_UPLOAD_BYTES >> 20:,} MiB an upload may "
                    "be; put it in the app's --adapters folder instead")
        mine = self.uploads.setdefault(visitor, [])
        digest = file_digest(path)
        key = UPLOAD + digest
        if key in mine:
            return None  # the same bytes again: listed once
        if len(mine) >= MAX_UPLOADS:
            return f"{name}: this page holds {MAX_UPLOADS} uploads, the most it may; reload the page to start afresh"
        if key not in self.files:
            if len(self.owners) >= MAX_HELD:
                return f"{name}: the app holds {MAX_HELD} uploads, the most it keeps; try again later"
            try:
                f = read_adapter(path)
            except SdloraError as e:
                return str(e).replace(str(path), name)
            f.path = Path(name)  # the name it was uploaded as; the temp file goes
            # A1111's Lora hash without kohya's is the sha256 of the file's bytes (AdapterFile.short_hash): known now
            f.metadata.setdefault("sshs_model_hash", digest)
            self.files[key] = f
        self.owners.setdefault(key, set()).add(visitor)
        mine.append(key)
        return None

    def forget(self, visitor: str) -> None:
        """`visitor` left: its uploads leave memory unless another visitor holds the same file."""
        for key in self.uploads.pop(visitor, []):
            holders = self.owners.get(key, set())
            holders.discard(visitor)
            if not holders:
                self.owners.pop(key, None)
                self.files.pop(key, None)
