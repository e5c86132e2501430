"""Typed, validated, versioned data: the one base model and the loaders that turn files into it.

Every structure that crosses a boundary (a profile file, a cluster file, a plan, a wire message) is a frozen
pydantic model derived from :class:`FrozenModel`: unknown fields are rejected, values are validated once where
they enter, and nothing changes afterwards. :func:`load_model` reads a TOML or JSON file into such a model and
turns any problem into a single :class:`~prima_sim.errors.InputError` line naming the file, the field and
what was expected.
"""

from __future__ import annotations

import difflib
import json
import os
import tempfile
import tomllib
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomli_w
from pydantic import BaseModel, ConfigDict, ValidationError

from prima_sim.errors import InputError


class FrozenModel(BaseModel):
    """Base of every typed record: immutable, unknown fields forbidden, validated on construction."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


M = TypeVar("M", bound=BaseModel)


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif str(item).startswith(("function-", "constrained-", "lax-or-strict", "json-or-python")):
            continue  # pydantic's internal validator names carry no meaning for a user
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _fields_at(cls: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """Names of the fields a model accepts at ``loc`` (the location of an unknown key, key included)."""
    cur: Any = cls
    for item in loc[:-1]:
        if isinstance(item, int) or str(item).startswith(("function-", "constrained-", "lax-or-strict")):
            continue
        fields = getattr(cur, "model_fields", None)
        if not fields or item not in fields:
            return []
        cur = _model_in(fields[item].annotation)
    fields = getattr(cur, "model_fields", None)
    return list(fields) if fields else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``X``, ``X | None``, ``tuple[X, ...]``, ``dict[str, X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def validation_to_input_error(
    source: str, exc: ValidationError, cls: type[BaseModel] | None = None
) -> InputError:
    """Turn the first problem of a pydantic ValidationError into a one-line InputError.

    An unknown key is reported before anything else (a misspelled required field is first of all an unknown
    key), with the closest known field name when there is one (``cls`` gives the names).
    """
    errors = exc.errors(include_url=False)
    err = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
    loc = tuple(err.get("loc", ()))
    field = _loc_to_path(loc)
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "missing":
        msg = "is required but missing"
    elif kind == "extra_forbidden":
        known = _fields_at(cls, loc) if loc else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6) if loc else []
        msg = "is not a known field" + (
            f": did you mean '{close[0]}'?" if close else
            (f" (known fields here: {', '.join(known)}; 'prima-sim schema' prints them all)" if known else
             " ('prima-sim schema' lists the known fields)")
        )  # fmt: skip
    elif (
        "input" in err
        and kind != "model_type"
        and "got " not in msg
        and not isinstance(err["input"], (dict, list))
    ):
        shown = repr(err["input"])
        if len(shown) > 60:
            shown = shown[:57] + "..."
        msg = f"{msg} (got {shown})"
    return InputError(source, field, msg)


def validate_model(cls: type[M], data: Any, source: str) -> M:
    """Validate ``data`` (already parsed) as ``cls``; problems become an :class:`InputError`."""
    if not isinstance(data, dict):
        raise InputError(source, "", f"expected a table/object at the top level, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise validation_to_input_error(source, exc, cls) from None


def read_structured(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or JSON (anything else) file into a dict, with one-line errors."""
    p = Path(path)
    if not p.exists():
        raise InputError(str(p), "", "file not found")
    if p.is_dir():
        raise InputError(str(p), "", "is a directory, expected a file")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise InputError(str(p), "", f"cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(str(p), "", "is not UTF-8 text (expected TOML or JSON)") from None
    if p.suffix.lower() == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InputError(str(p), "", f"is not valid TOML: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            str(p), "", f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(data, dict):
        raise InputError(str(p), "", f"expected a JSON object at the top level, got {type(data).__name__}")
    return data


def load_model(cls: type[M], path: str | Path) -> M:
    """Load and validate a TOML or JSON file as ``cls``."""
    return validate_model(cls, read_structured(path), str(path))


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process's umask (0644 under the usual umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a crash never leaves half a file, and an old file stays intact
    until the new one is complete. The file gets the mode an ordinary write would give it (0644 under umask
    022), not the 0600 of a temporary file, so a worker under another account can read a plan or manifest."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def dump_model(model: BaseModel, path: str | Path) -> Path:
    """Write a model as TOML (``.toml``) or JSON (anything else), atomically."""
    p = Path(path)
    data = model.model_dump(mode="json", exclude_none=True)
    if p.suffix.lower() == ".toml":
        return atomic_write_text(p, tomli_w.dumps(data))
    return atomic_write_text(p, json.dumps(data, indent=2) + "\n")
