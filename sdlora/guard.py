"""One output policy for every command: an output never deletes or replaces what this run did not create unless
--overwrite is given, never an input of the same run, and a second run writing the same output is refused while the
first holds it.

- `check_file(path, ...)` / `check_folder(path, ...)`: before any heavy work, refuse an output that is an input, is in
  the way, exists (without --overwrite), has the wrong suffix, or cannot be written.
- `write_folder(out, fill, overwrite)`: a folder output is filled beside and swapped in when the target is new or
  empty; with --overwrite only what sdlora wrote there (listed in its `sdlora-written.txt` record) is replaced, and
  anything else the user keeps in that folder stays.
- `reserve(folder, pattern)`: a generated file name taken atomically (O_EXCL), so two runs never pick the same one.
- `OutputLock(path)`: a lock file with the owner's pid beside an output; a lock whose process is gone is stale.

Why hand-written: neither the standard library nor the stack (accelerate, huggingface_hub's file locks, which wait
instead of refusing and do not record an owner) has an "exclusive output with a named owner" primitive.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from sdlora.errors import SdloraError

RECORD = "sdlora-written.txt"  # in a folder sdlora wrote: the relative paths of the files it wrote, one a line


def _resolved(p: Path) -> Path:
    try:
        return Path(p).expanduser().resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(Path(p).expanduser()))


def same_or_inside(path: Path, other: Path) -> bool:
    """Whether `path` is `other` or lies inside it (both resolved: links and `..` followed)."""
    a, b = _resolved(path), _resolved(other)
    return a == b or b in a.parents


def existing_ancestor(folder: Path) -> Path:
    """`folder` itself if it exists, else the nearest existing folder (or file) above it."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def probe_writable(folder: Path, flag: str) -> None:
    """Refuse when a file cannot be created in `folder` (or the nearest existing folder above it). Catches what
    os.access misses as root: read-only mounts, full disks, quota."""
    anc = existing_ancestor(folder)
    if not anc.is_dir():
        raise SdloraError(f"cannot create the folder {folder}: {anc} is a file, not a folder; choose another {flag}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".sdlora-probe.", suffix=".tmp", dir=anc)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
            Path(tmp).unlink(missing_ok=True)
    except OSError as e:
        raise SdloraError(f"cannot write to {folder} ({e.strerror or e} in {anc}); choose a writable {flag}") from e


def _not_an_input(path: Path, inputs: dict[str, object], flag: str) -> None:
    for option, value in inputs.items():
        for p in value if isinstance(value, (list, tuple)) else [value]:
            if p is None or not str(p) or not Path(p).expanduser().exists():
                continue
            if same_or_inside(path, p) if Path(p).is_dir() else _resolved(path) == _resolved(p):
                raise SdloraError(f"{flag} {path} is the input {option} {p}: the output would replace what this "
                                  "command reads; write it elsewhere")
            if Path(path).exists() and Path(path).is_dir() and same_or_inside(p, path):
                raise SdloraError(f"{flag} {path} holds the input {option} {p}: replacing the folder would delete "
                                  "what this command reads; write it elsewhere")


def check_file(path, flag: str = "--out", *, inputs: dict[str, object] | None = None, overwrite: bool = False,
               suffixes: tuple[str, ...] = (".safetensors",)) -> Path:
    """Refuse, before any heavy work, a file output that would damage something or cannot be written."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise SdloraError(f"{flag} {path}: the output must end in {' or '.join(suffixes)}, e.g. "
                          f"{path.with_suffix(suffixes[0]).name if path.suffix else path.name + suffixes[0]}")
    if path.is_dir():
        example = path / ("out" + (suffixes or ("",))[0])
        raise SdloraError(f"{flag} {path} is a folder; pass a file path such as {example}")
    _not_an_input(path, inputs or {}, flag)
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise SdloraError(f"{flag} {path} exists and is not a regular file; choose another path")
        if not overwrite:
            raise SdloraError(f"{flag} {path} already exists; choose another path, or pass --overwrite to replace it")
    probe_writable(path.parent, flag)
    return path


def _record(folder: Path) -> set[str] | None:
    """The files sdlora wrote into `folder` (relative paths), or None when sdlora did not write it."""
    try:
        return {ln for ln in (folder / RECORD).read_text(encoding="utf-8").splitlines() if ln}
    except (OSError, UnicodeDecodeError):
        return None


def _is_empty(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except OSError:
        return False


def check_folder(path, flag: str = "--out", *, inputs: dict[str, object] | None = None,
                 overwrite: bool = False) -> Path:
    """Refuse, before any heavy work, a folder output that would delete what sdlora did not write there."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SdloraError(f"{flag} {path} exists and is not a folder; choose another path")
    _not_an_input(path, inputs or {}, flag)
    if path.is_dir() and not _is_empty(path):
        if not overwrite:
            raise SdloraError(f"{flag} {path} is a folder that is not empty; choose a new or empty folder, or pass "
                              "--overwrite to replace what sdlora wrote there (nothing else is touched)")
        if _record(path) is None:
            raise SdloraError(f"{flag} {path} holds files sdlora did not write, so even --overwrite leaves it alone; "
                              "choose a new or empty folder")
    probe_writable(path.parent if not path.is_dir() else path, flag)
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != RECORD)


def write_folder(out, fill, overwrite: bool = False) -> Path:
    """`fill(tmp_folder)` beside `out`, then swap it in: a crash never leaves half a folder, and nothing sdlora did
    not write is deleted. Call `check_folder` first; this checks again (the folder may have changed meanwhile)."""
    from sdlora.formats.file_io import usual_permissions

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill(tmp)
        (tmp / RECORD).write_text("\n".join(_listing(tmp)) + "\n", encoding="utf-8")
        usual_permissions(tmp)
        if not out.exists():
            os.rename(tmp, out)  # fails, rather than replaces, if another process made `out` meanwhile
        elif _is_empty(out):
            os.replace(tmp, out)  # rename(2) over an empty folder
        else:
            _swap_in(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_in(tmp: Path, out: Path, overwrite: bool) -> None:
    """Replace a folder sdlora wrote: the old one is renamed aside, the new one renamed in, then the files the user
    added to the old one (not in its record) are moved into the new one, and the rest of the old one is deleted."""
    written = _record(out)
    if not overwrite or written is None:
        raise SdloraError(f"{out} is not empty (something was written there meanwhile); nothing was replaced: "
                          "choose a new or empty folder")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, old / "x")
    os.rename(tmp, out)
    for p in sorted((old / "x").rglob("*")):
        rel = p.relative_to(old / "x")
        if p.is_file() and str(rel) not in written and p.name != RECORD and not (out / rel).exists():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, out / rel)
    shutil.rmtree(old, ignore_errors=True)


def reserve(folder: Path, name_for, start: int = 0, limit: int = 100_000) -> Path:
    """The first free name `name_for(i)` (i = start, start+1, ...) in `folder`, created empty with O_EXCL so that no
    other run can take it; the caller writes the file over it (atomic_write renames onto it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + limit):
        p = folder / name_for(i)
        try:
            os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return p
        except FileExistsError:
            continue
    raise SdloraError(f"{folder}: no free file name after {limit} tries; choose another folder")


# ---------------------------------------------------------------- one writer per output

def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so that a reused pid is not taken for the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process (a shared folder): cannot be checked, so it counts as running
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _start_time(pid)
    return started is None or owner.get("started") in (None, started)


def lock_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


class OutputLock:
    """`with OutputLock(out, flag):` — refuse while another live sdlora process writes `out`; take over a stale lock
    (its process is gone, e.g. killed with SIGKILL)."""

    def __init__(self, path, flag: str = "--out"):
        self.path, self.flag, self.file = Path(path), flag, lock_path(Path(path))
        self.held = False

    def acquire(self) -> "OutputLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.file.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise SdloraError(f"{self.flag} {self.path}: could not take the lock {self.file}; try again")

    def _take_if_stale(self) -> None:
        try:
            owner = json.loads(self.file.read_text(encoding="utf-8"))
            owner = owner if isinstance(owner, dict) else {}
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            owner = {}
        if owner and _alive(owner):
            raise SdloraError(f"{self.flag} {self.path} is being written by another sdlora run (pid {owner['pid']} "
                              f"on {owner.get('host')}, since {owner.get('since')}); wait for it to finish or choose "
                              f"another path (if no such run is going, delete {self.file})")
        try:
            if not owner and time.time() - self.file.stat().st_mtime < 5:
                time.sleep(0.2)  # being written by its owner this instant
                return
            seen = self.file.read_bytes()
            # stale: renamed aside first, and put back if what was renamed is not what was read (another run broke
            # the stale lock and took a new one meanwhile), so that of two runs breaking it only one wins
            aside = self.file.with_name(f"{self.file.name}.stale.{os.getpid()}")
            os.rename(self.file, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_bytes() != seen:
                os.link(aside, self.file)
        except OSError:
            pass
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.file.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
