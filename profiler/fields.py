"""Field-by-field checks of the JSON files the tools read: one small schema language, one message.

Every file format (cost table, cluster file, plan, node map, hostfile) declares its fields with
the specs below; `check(value, spec)` walks the parsed JSON and raises `FieldError(path, problem)`
for the first field that is missing, of the wrong JSON type or out of range, e.g.
``nodes[2].memory_bytes: must be a number > 0, got -5``. The caller prefixes the file and adds
how to fix it, so every reader says the same thing the same way. JSON's own edge cases (NaN,
Infinity, integers too long for any machine) are refused while parsing (`profiler.files`).

Booleans are never numbers here (Python's ``True == 1`` is not JSON's), and integers and floats
are both "a number" unless a spec asks for an integer. Plain Python, no MLX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_INT = 2**63 - 1  # nothing in these files needs more; a longer integer is a typo


class FieldError(Exception):
    """`path`: where in the file (``rows[3].decode_s[0]``), `problem`: what is wrong."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path or 'top level'}: {problem}")
        self.path = path or "top level"
        self.where = path  # "" at the top level
        self.problem = problem


def shown(v: Any) -> str:
    """A short, unambiguous rendering of a bad value for a message."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, int) and abs(v) > 10**18:
        return f"an integer of {len(str(abs(v)))} digits"
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, (list, dict)):
        kind = "a list" if isinstance(v, list) else "an object"
        return f"{kind} of {len(v)} item{'s' if len(v) != 1 else ''}" if v else \
            ("an empty list" if isinstance(v, list) else "an empty object")
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


class Spec:
    def describe(self) -> str:
        raise NotImplementedError

    def check(self, v: Any, path: str) -> None:
        raise NotImplementedError

    def fail(self, v: Any, path: str):
        raise FieldError(path, f"must be {self.describe()}, got {shown(v)}")


class _Any(Spec):
    def describe(self) -> str:
        return "any JSON value"

    def check(self, v, path):
        pass


ANY = _Any()


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Num(Spec):
    """A finite number; `gt`/`ge` lower bounds, `le` upper bound; `integer`: no fraction."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    integer: bool = False

    def describe(self) -> str:
        what = "an integer" if self.integer else "a number"
        if self.integer and self.gt == 0:
            what = "a positive integer"
        elif self.gt is not None:
            what += f" > {self.gt:g}"
        if self.ge is not None:
            what += f" >= {self.ge:g}"
        if self.le is not None:
            what += f" <= {self.le:g}" if self.le < 1e15 else ""
        return what

    def check(self, v, path):
        if not _is_num(v) or (isinstance(v, float) and not math.isfinite(v)):
            self.fail(v, path)
        if self.integer and not isinstance(v, int):
            self.fail(v, path)
        if abs(v) > MAX_INT:
            raise FieldError(path, f"{shown(v)} is far too large for this field; write "
                             f"{self.describe()}")
        if (self.gt is not None and not v > self.gt) or (
                self.ge is not None and not v >= self.ge) or (self.le is not None
                                                             and not v <= self.le):
            self.fail(v, path)


def Int(ge: int | None = None, gt: int | None = None, le: int | None = None) -> Num:
    return Num(ge=ge, gt=gt, le=le, integer=True)


@dataclass
class Str(Spec):
    choices: tuple[str, ...] | None = None
    nonempty: bool = False

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        return "a non-empty string" if self.nonempty else "a string"

    def check(self, v, path):
        if not isinstance(v, str) or (self.nonempty and not v.strip()) or (
                self.choices and v not in self.choices):
            self.fail(v, path)


class Bool(Spec):
    def describe(self) -> str:
        return "true or false"

    def check(self, v, path):
        if not isinstance(v, bool):
            self.fail(v, path)


@dataclass
class Opt(Spec):
    """`inner` or null."""

    inner: Spec

    def describe(self) -> str:
        return f"{self.inner.describe()} or null"

    def check(self, v, path):
        if v is not None:
            try:
                self.inner.check(v, path)
            except FieldError as e:
                if e.where == path:  # the value itself is wrong: say null is allowed too
                    self.fail(v, path)
                raise


@dataclass
class List(Spec):
    item: Spec
    nonempty: bool = False

    def describe(self) -> str:
        return ("a non-empty list" if self.nonempty else "a list") + \
            f" of {_plural(self.item.describe())}"

    def check(self, v, path):
        if not isinstance(v, list) or (self.nonempty and not v):
            self.fail(v, path)
        for i, x in enumerate(v):
            self.item.check(x, _join(path, i))


@dataclass
class Map(Spec):
    """An object whose keys are free (non-empty strings) and whose values all match `value`."""

    value: Spec
    nonempty: bool = False

    def describe(self) -> str:
        return ("a non-empty object" if self.nonempty else "an object") + \
            f" of {_plural(self.value.describe())}"

    def check(self, v, path):
        if not isinstance(v, dict) or (self.nonempty and not v):
            self.fail(v, path)
        for k, x in v.items():
            if not k.strip():
                raise FieldError(path, "has an empty key; every key must be a non-empty name")
            self.value.check(x, _join(path, k))


@dataclass
class Obj(Spec):
    """An object with known `fields` (all optional unless in `required`); other keys must
    match `extra` (ANY by default: notes and fields of later releases are kept)."""

    fields: dict[str, Spec] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    extra: Spec | None = ANY
    name: str = "an object"

    def describe(self) -> str:
        return self.name

    def check(self, v, path):
        if not isinstance(v, dict):
            self.fail(v, path)
        for k in self.required:
            if k not in v:
                raise FieldError(_join(path, k), "is missing")
        for k, x in v.items():
            spec = self.fields.get(k, self.extra)
            if spec is None:
                raise FieldError(_join(path, k), f"is not a field of {self.name}")
            spec.check(x, _join(path, k))


@dataclass
class OneOf(Spec):
    options: tuple[Spec, ...]
    name: str

    def describe(self) -> str:
        return self.name

    def check(self, v, path):
        errors = []
        for s in self.options:
            try:
                s.check(v, path)
                return
            except FieldError as e:
                errors.append(e)
        deepest = max(errors, key=lambda e: len(e.where))
        if deepest.where != path:
            raise deepest
        self.fail(v, path)


def _plural(desc: str) -> str:
    for a in ("an ", "a "):
        if desc.startswith(a):
            return desc[len(a):].replace("number", "numbers", 1).replace(
                "integer", "integers", 1).replace("string", "strings", 1).replace(
                "object", "objects", 1)
    return desc


def check(value: Any, spec: Spec, path: str = "") -> None:
    """Raise FieldError for the first field of `value` that does not match `spec`."""
    spec.check(value, path)


# -- fields shared by several formats -------------------------------------------------------

BYTES = Num(ge=0, le=MAX_INT)  # a byte count
POS_BYTES = Num(gt=0, le=MAX_INT)
SECONDS = Num(ge=0)
