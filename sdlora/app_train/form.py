"""The Train tab's settings, generated from TrainConfig's fields: a field added there appears on the page (under
"Advanced", in its --help group) with its help text, default and choices, without touching the app.

Which fields a page may set is decided by their type, so that a new option cannot open a path to the server's files
by being added: booleans, numbers and fields with a fixed set of choices are on the page; free text only for the
fields named in FREE_TEXT (prompts and option strings, never a path). Text fields that name files or folders (the
dataset, outputs, caches, the resume point, model parts) are set by the app itself (APP_SET) or not at all.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from sdlora.cli import OTHER_GROUP, TRAIN_GROUPS
from sdlora.config import TrainConfig, load_toml
from sdlora.errors import SdloraError

# on the page itself; the rest of the page's fields go under "Advanced"
ESSENTIALS = ("model", "prompt", "class_prompt", "num_class_images", "prior_loss_weight", "steps", "rank", "lr",
              "network", "preset")
# text a visitor may type: prompts and option strings (the run reads no file named by them)
FREE_TEXT = ("prompt", "trigger", "class_prompt", "optimizer_args", "sample_prompts")
# set by the app for every job (paths inside the job's folder, its queue) and never taken from a page or a TOML file
APP_SET = ("images", "class_images", "out", "output_dir", "name", "cache_dir", "resume", "progress_file", "overwrite")
# the page's defaults where they differ from `sdlora train`'s: it shows sample grids as the run goes
APP_DEFAULTS = {"sample_every": 100}


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # bool, int, float, choice, text
    default: object
    help: str
    choices: tuple | None
    optional: bool  # None is a value (empty on the page)
    group: str  # its --help group

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def label(self) -> str:
        return self.flag[2:]


def _type(f) -> tuple[type, bool]:
    t = f.type if not isinstance(f.type, str) else typing.get_type_hints(TrainConfig)[f.name]
    args = typing.get_args(t)
    optional = type(None) in args
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in args if a is not type(None))
    return t, optional


def _field(f, hints) -> Field | None:
    t, optional = hints[f.name]
    choices = f.metadata.get("choices")
    if f.name in APP_SET:
        return None
    if t is bool:
        kind = "bool"
    elif t in (int, float):
        kind = t.__name__
    elif choices:
        kind = "choice"
    elif f.name in FREE_TEXT or f.name == "model":  # the model: from the app's list only (tab.py)
        kind = "text"
    else:
        return None  # free text that may name a file: never from a page
    where = {n: g for g, names in TRAIN_GROUPS.items() for n in names}
    default = APP_DEFAULTS.get(f.name, None if f.default is MISSING else f.default)
    return Field(f.name, kind, default, f.metadata.get("help", ""), tuple(choices) if choices else None, optional,
                 f.metadata.get("group") or where.get(f.name, OTHER_GROUP))


def page_fields() -> list[Field]:
    """Every field a page may set, in TrainConfig's order."""
    hints = {f.name: _type(f) for f in fields(TrainConfig)}
    return [x for f in fields(TrainConfig) if (x := _field(f, hints)) is not None]


def advanced_fields() -> dict[str, list[Field]]:
    """The page's fields that are not essentials, by --help group (in the order of `sdlora train --help`)."""
    out: dict[str, list[Field]] = {g: [] for g in (*TRAIN_GROUPS, OTHER_GROUP)}
    for f in page_fields():
        if f.name not in ESSENTIALS:
            out.setdefault(f.group, []).append(f)
    return {g: fs for g, fs in out.items() if fs}


def value_of(f: Field, raw) -> object:
    """A widget's value as the field's type: empty is None for an optional field and the default otherwise."""
    if raw is None or (isinstance(raw, str) and not raw.strip() and f.kind != "bool"):
        return None if f.optional else f.default
    if f.kind == "bool":
        return bool(raw)
    if f.kind == "int":
        if isinstance(raw, float) and not raw.is_integer():
            raise SdloraError(f"{f.flag} must be a whole number, got {raw:g}")
        return int(raw)
    if f.kind == "float":
        return float(raw)
    return str(raw).strip() if f.kind == "text" else raw


def settings_from(raw: dict[str, object]) -> dict[str, object]:
    """The page's widget values (field name -> value) as training settings: the values that differ from
    `sdlora train`'s defaults, typed. A name that is not a page field is refused (a request may send anything)."""
    known = {f.name: f for f in page_fields()}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SdloraError(f"the page cannot set {', '.join(unknown)}; the app sets the paths of a job itself")
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    out = {}
    for name, v in raw.items():
        value = value_of(known[name], v)
        if value != defaults[name]:
            out[name] = value
    return out


def to_flags(settings: dict[str, object]) -> list[str]:
    """`sdlora train` flags for `settings` (as `--name=value`, so that a value starting with '-' stays a value)."""
    out = []
    for name, v in settings.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(v, bool):
            if v:
                out.append(flag)
        elif v is not None:
            out.append(f"{flag}={v}")  # str(float) round-trips exactly
    return out


def from_toml(path: str | Path, shown_name: str | None = None) -> tuple[dict[str, object], list[str]]:
    """The page's fields a TOML settings file sets, and the keys it sets that a page may not (ignored: the app sets
    the paths of a job itself). Errors name the file as `shown_name` (an upload's name, not its temp path)."""
    try:
        data = load_toml(path)
    except SdloraError as e:
        raise SdloraError(str(e).replace(str(path), shown_name or Path(path).name)) from None
    known = {f.name for f in page_fields()}
    return {k: v for k, v in data.items() if k in known}, sorted(k for k in data if k not in known)


def presets(folder: Path | None = None) -> dict[str, Path]:
    """The TOML presets shipped in configs/ (a checkout's), by file name."""
    folder = folder or Path(__file__).resolve().parents[2] / "configs"
    return {p.name: p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}
