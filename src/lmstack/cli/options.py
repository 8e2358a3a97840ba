"""Typed options: a dataclass is the single source of truth for a command's options.

    @dataclass
    class TrainOptions:
        lr: float = 3e-4       # doc comes from `field(metadata={"help": ...})`
    add_options(parser, TrainOptions)             # --lr, --recipe
    opts = build_options(TrainOptions, args)      # recipe YAML, then flags on top

Every field is a flag with dashes (`max_steps` -> `--max-steps`) and a recipe key with
underscores (dashes accepted too). An unknown recipe key or flag is an error that names it
and lists the valid ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lmstack.utils.errors import LmstackError

_UNSET = object()


class Parser(argparse.ArgumentParser):
    """argparse whose 'unrecognized arguments' error lists the valid options.

    Abbreviations are off: `--max-step` must not silently mean `--max-steps`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # A leaf subcommand reports its own unknown options, so the error lists *its*
        # valid options rather than the top-level parser's.
        ns, extras = super().parse_known_args(args, namespace)
        is_leaf = not any(isinstance(a, argparse._SubParsersAction) for a in self._actions)
        if extras and is_leaf and self.prog.count(" ") >= 1:
            self.error("unrecognized arguments: " + " ".join(extras))
        return ns, extras

    def error(self, message: str):  # noqa: D401
        if "unrecognized arguments" in message:
            valid = sorted({s for a in self._actions for s in a.option_strings if s.startswith("--")})
            bad = message.split(":", 1)[1].strip().split()[0]
            close = difflib.get_close_matches(bad, valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            message = f"unknown option {bad}{hint}; valid options: {' '.join(valid)}"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _base_type(tp: Any) -> Any:
    """Unwrap Optional[X] / X | None to X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        return str
    return tp


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _parse_value(name: str, tp: Any, value: Any) -> Any:
    """Coerce a recipe or flag value to the field's type, with an error naming the key."""
    base = _base_type(tp)
    if value is None:
        return None
    try:
        if base is bool:
            return value if isinstance(value, bool) else _bool(str(value))
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
        if typing.get_origin(base) in (list, tuple):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            (inner,) = typing.get_args(base)[:1] or (str,)
            return [_parse_value(name, inner, v) for v in value]
        if typing.get_origin(base) is dict or base is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise LmstackError(f"option {name}: cannot read {value!r} as {getattr(base, '__name__', base)}") from None
    return value


def _help(f: dataclasses.Field) -> str:
    h = f.metadata.get("help", "")
    if f.default is not dataclasses.MISSING:
        h = f"{h} (default: {f.default})".strip()
    return h


def add_options(parser: argparse.ArgumentParser, cls: type, recipe: bool = True,
                only: typing.Iterable[str] | None = None, defaults: dict[str, Any] | None = None) -> None:
    """Add one `--flag` per dataclass field (and `--recipe FILE`). `only`: just these fields;
    `defaults`: the defaults the command really uses where they are not the dataclass's
    (shown in --help; pass the same dict as `base` to build_options)."""
    if recipe:
        parser.add_argument("--recipe", default=None, metavar="FILE",
                            help="YAML recipe; flags given on the command line override its keys")
    hints = typing.get_type_hints(cls)
    keep = None if only is None else set(only)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is False or (keep is not None and f.name not in keep):
            continue
        flag = "--" + f.name.replace("_", "-")
        base = _base_type(hints[f.name])
        metavar = base.__name__.upper() if isinstance(base, type) else "VALUE"
        # A boolean flag may be given bare: `--resume` means `--resume true`.
        extra = {"nargs": "?", "const": "true"} if base is bool else {}
        help_text = _help(f) if not defaults or f.name not in defaults else \
            f"{f.metadata.get('help', '')} (default: {defaults[f.name]})".strip()
        parser.add_argument(flag, dest=f.name, default=_UNSET, metavar=metavar, help=help_text, **extra)


def given(args: argparse.Namespace, names: typing.Iterable[str]) -> dict[str, Any]:
    """The flags among `names` given on the command line (name -> raw value)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, _UNSET) is not _UNSET}


def valid_keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def from_dict(cls: type, data: dict[str, Any], source: str = "recipe"):
    """Build `cls` from a dict, rejecting unknown keys with the list of valid ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k not in names:
            close = difflib.get_close_matches(k, sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LmstackError(f"unknown {source} key {key!r}{hint}; valid keys: {', '.join(sorted(names))}")
        kwargs[k] = _parse_value(k, hints[k], value)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise LmstackError(str(e)) from None


def load_recipe(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise LmstackError(f"recipe {p} not found; pass an existing YAML file to --recipe")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LmstackError(f"recipe {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise LmstackError(f"recipe {p} must be a mapping of key: value, got {type(data).__name__}")
    return data


def build_options(cls: type, args: argparse.Namespace, base: dict[str, Any] | None = None,
                  recipe: dict[str, Any] | None = None):
    """Defaults < `base` < recipe < flags given on the command line. The recipe is the file
    --recipe names, unless the caller passes the mapping it has read already."""
    data: dict[str, Any] = dict(base or {})
    if recipe is None:
        recipe = load_recipe(getattr(args, "recipe", None))
    data.update({k.replace("-", "_"): v for k, v in recipe.items()})
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, _UNSET)
        if v is not _UNSET:
            data[f.name] = v
    return from_dict(cls, data)
