"""Config fields declared once: each option's default, bounds, help and role in one ``option()``.

Every stage's config is a dataclass whose fields are made with ``option(...)``. From that one
declaration come

* the checks (``check``, called by each config's ``__post_init__``, so a bad value fails when the
  config is built: on the command line, in a test, and in the sweep's ``--dry-run``, which builds
  the config of every cell before anything is submitted);
* the ``brainhpc <stage>`` command line (``add_arguments`` / ``from_args``): flags, types,
  defaults and help come from the fields, nothing is written twice;
* the cell identity (``brainhpc.cell.identity``): fields marked ``run=True`` say how to run
  (``out``, ``force``, ``device``...), not what; they are left out of it.

Types are read from the annotations: ``int``, ``float``, ``str``, ``bool``, ``Path``, ``dict``,
tuples of numbers (``"16,32,64"`` on the command line) and tuples of strings (repeatable or
comma-separated flags), each optionally ``| None``.
"""

from __future__ import annotations

import argparse
import json
import math
import types
import typing
from dataclasses import MISSING, Field, field, fields
from pathlib import Path

from brainhpc.errors import BrainhpcError


def option(default=MISSING, help: str = "", *, factory=None, min=None, max=None, gt=None,
           lt=None, choices=None, odd: bool = False, run: bool = False, flag: str | None = None,
           nargs: str | None = None, metavar: str | None = None, cli: bool = True) -> Field:
    """A dataclass field with what ``check`` and the command line need.

    ``min``/``max`` are inclusive bounds, ``gt``/``lt`` exclusive ones; ``choices`` the valid
    values; ``run``: how to run, not what (outside the identity); ``flag``: the command-line name
    when it differs from the field's; ``cli=False``: not on the command line."""
    meta = {"help": help, "min": min, "max": max, "gt": gt, "lt": lt, "choices": choices,
            "odd": odd, "run": run, "flag": flag, "nargs": nargs, "metavar": metavar, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


# ------------------------------------------------------------------------------ types

def _kind(annotation) -> tuple[object, bool]:
    """(base type, None allowed) of an annotation: ``int | None`` -> (int, True)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], optional
        if str in rest and any(typing.get_origin(a) is tuple for a in rest):
            return tuple[str, ...], optional  # "a,b" or ("a", "b")
        raise TypeError(f"unsupported option type {annotation}")
    return annotation, False


def _element(kind) -> type | None:
    """The element type of a tuple annotation (``tuple[int, ...]`` -> int), else None."""
    if typing.get_origin(kind) is not tuple:
        return None
    return typing.get_args(kind)[0]


def hints(cls) -> dict:
    return typing.get_type_hints(cls)


# ------------------------------------------------------------------------------ checks

def _expected(kind, meta: dict) -> str:
    if meta["choices"] is not None:
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    if kind is bool:
        return "true or false"
    what = {int: "an integer", float: "a number", str: "a string", dict: "a table"}.get(
        kind, "a list of numbers" if _element(kind) in (int, float) else "a list of names")
    if meta.get("odd"):
        what = "an odd integer"
    lo, hi, gt, lt = meta["min"], meta["max"], meta["gt"], meta["lt"]
    if lo is not None and hi is not None:
        return f"{what} in {lo}..{hi}"
    if gt is not None and lt is not None:
        return f"{what} in ({gt}, {lt})"
    if lo is not None and lt is not None:
        return f"{what} in [{lo}, {lt})"
    bounds = [f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "",
              f"> {gt}" if gt is not None else "", f"< {lt}" if lt is not None else ""]
    return " ".join([what, *[b for b in bounds if b]])


def _in_bounds(value, meta: dict) -> bool:
    lo, hi, gt, lt = meta["min"], meta["max"], meta["gt"], meta["lt"]
    return not ((lo is not None and value < lo) or (hi is not None and value > hi)
                or (gt is not None and value <= gt) or (lt is not None and value >= lt))


def _number(value, kind) -> bool:
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)


def _convert(value, kind):
    """``value`` as ``kind`` where the conversion is lossless, else ``value`` unchanged."""
    if kind is Path and isinstance(value, (str, Path)):
        return Path(value).expanduser()
    element = _element(kind)
    if element is None:
        return value
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
        if element in (int, float):
            try:
                value = [element(v) for v in value]
            except ValueError:
                return None
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _valid(value, kind, meta: dict) -> bool:
    if kind in (int, float):
        return _number(value, kind) and _in_bounds(value, meta) and not (
            meta["odd"] and value % 2 == 0)
    element = _element(kind)
    if element is not None:
        return isinstance(value, tuple) and all(
            _number(v, element) and _in_bounds(v, meta) if element in (int, float)
            else isinstance(v, element) for v in value)
    if kind is Path:
        return isinstance(value, Path)
    return isinstance(value, kind) if isinstance(kind, type) else True


def check(cfg) -> None:
    """Convert and check every field of ``cfg`` against its option; the error names the stage
    (``cfg.stage``), the field and what is expected."""
    stage = getattr(cfg, "stage", type(cfg).__name__)
    types_ = hints(type(cfg))
    for f in fields(cfg):
        if not f.metadata:
            continue  # a plain field: the config checks it itself
        kind, optional = _kind(types_[f.name])
        value = getattr(cfg, f.name)
        if value is None and optional:
            continue
        value = _convert(value, kind)
        choices = f.metadata.get("choices")
        if choices is not None and value not in tuple(choices):
            raise BrainhpcError(f"{stage}: unknown {f.name} {value!r}; valid: "
                                f"{', '.join(str(c) for c in choices)}")
        if not _valid(value, kind, f.metadata):
            shown = getattr(cfg, f.name)
            raise BrainhpcError(f"{stage}: {f.name} must be {_expected(kind, f.metadata)}"
                                f"{' (or unset)' if optional else ''}, got {shown!r}")
        setattr(cfg, f.name, value)


# ------------------------------------------------------------------------------ command line

def parse_option(text: str) -> tuple[str, object]:
    """``--opt KEY=VALUE``: VALUE is read as JSON when it parses (numbers, lists, booleans),
    else kept as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--opt expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _help(f: Field, kind) -> str:
    text = f.metadata.get("help", "")
    default = f.default
    if kind is bool:
        return f"turn off: {text}" if default is True else text
    if default is not MISSING and default is not None and default != "":
        shown = ",".join(str(v) for v in default) if isinstance(default, tuple) else default
        text = f"{text} (default: {shown})" if text else f"default: {shown}"
    return text


def _argument(f: Field, kind) -> tuple[str, dict]:
    """The flag and ``add_argument`` keywords of one field."""
    meta = f.metadata
    name = (meta.get("flag") or f.name).replace("_", "-")
    required = f.default is MISSING and f.default_factory is MISSING
    kw: dict = {"dest": f.name, "help": _help(f, kind)}
    if not required:
        kw["default"] = argparse.SUPPRESS  # unset flags leave the dataclass default alone
    else:
        kw["required"] = True
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    elif meta.get("choices") is not None and kind is str:
        kw["metavar"] = "{" + ",".join(str(c) for c in meta["choices"]) + "}"
    elif kind in (int, float):
        kw["metavar"] = "N" if kind is int else "X"
    elif kind is Path:
        kw["metavar"] = "PATH"
    if kind is bool:
        if f.default is True:
            return f"--no-{name}", {**kw, "action": "store_false"}
        return f"--{name}", {**kw, "action": "store_true"}
    if kind is dict:
        return f"--{name}", {**kw, "action": "append", "type": parse_option,
                             "metavar": meta.get("metavar") or "KEY=VALUE"}
    if meta.get("nargs"):
        return f"--{name}", {**kw, "nargs": meta["nargs"]}
    if _element(kind) is str:
        return f"--{name}", {**kw, "action": "append"}
    convert = {int: int, float: float, Path: Path}.get(kind, str)
    return f"--{name}", {**kw, "type": convert}


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of ``cls`` that is on the command line."""
    types_ = hints(cls)
    # what to compute first, how to run it (out, force, device...) after
    for f in sorted(fields(cls), key=lambda f: bool(f.metadata.get("run"))):
        if not f.metadata or not f.metadata.get("cli", True):
            continue
        kind, _ = _kind(types_[f.name])
        flag, kw = _argument(f, kind)
        parser.add_argument(flag, **kw)


def from_args(cls, args: argparse.Namespace):
    """``cls`` built from the parsed flags (unset ones keep their dataclass default)."""
    types_ = hints(cls)
    given = vars(args)
    values = {}
    for f in fields(cls):
        if f.name not in given:
            continue
        kind, _ = _kind(types_[f.name])
        value = given[f.name]
        if kind is dict:
            value = dict(value)
        elif f.metadata.get("nargs"):
            value = " ".join(value)
        elif _element(kind) is str and isinstance(value, list):
            value = ",".join(value)
        values[f.name] = value
    return cls(**values)

