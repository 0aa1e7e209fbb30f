"""The spec grammar shared by norms, backbones, datasets and probes.

``family[:positional][,key=value...]``, e.g. ``bn``, ``lp:inf``, ``lp:1,centered=true``, ``gn:32``,
``noisy-bn:mu=0.5,sigma=1.25``, ``timm:resnet18``. Values are typed by the registered factory's parameters;
the canonical form lists every parameter (defaults filled) and is what configs and checkpoints store.
"""

from __future__ import annotations

import inspect
import math
import typing
from dataclasses import dataclass
from typing import Annotated, Any

from normzoo.errors import SpecError, did_you_mean

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
MAX_SPEC_CHARS = 500  # a spec is a short name with a few parameters; anything longer is not one


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric spec parameter, declared as ``Annotated[int, Range(1)]`` in the factory.

    ``low``/``high`` are inclusive bounds unless ``low_open``/``high_open``; ``None`` leaves that side open.
    Floats must be finite unless ``inf=True`` (e.g. ``lp``'s p). A value outside is a one-line :class:`SpecError`
    when the spec is parsed, before anything is built.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    inf: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and math.isinf(value):
            return self.inf and value > 0
        return not ((self.low is not None and (value < self.low or (self.low_open and value == self.low)))
                    or (self.high is not None and (value > self.high or (self.high_open and value == self.high))))

    def describe(self) -> str:
        if self.low is not None and self.high is not None and not (self.low_open or self.high_open):
            return f"in {_number(self.low)}..{_number(self.high)}" + (" or inf" if self.inf else "")
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '≥'} {_number(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '≤'} {_number(self.high)}")
        text = " and ".join(parts) or "finite"
        return text + (" or inf" if self.inf else "")


# Ranges most factories need, by name (``eps: NonNegative = 1e-5``); a plugin may use them or its own Range.
NonNegative = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]
PositiveInt = Annotated[int, Range(1)]
Count = Annotated[int, Range(0)]
Seed = Annotated[int, Range(0, 2**32 - 1)]
# A backbone's channel multiplier: ×8 of VGG-11 is already a 2.4 GB model.
Width = Annotated[float, Range(0, 8, low_open=True)]
Pad = Annotated[int, Range(0, 64)]  # pixels of zero padding around an image
Side = Annotated[int, Range(1, 1024)]  # image height/width
Channels = Annotated[int, Range(1, 64)]
Classes = Annotated[int, Range(1, 100_000)]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def clip(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters with a note of the rest (errors echo user input, never megabytes)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


@dataclass(frozen=True)
class Param:
    """One typed, defaulted parameter of a registered factory."""

    name: str
    type: type
    default: Any
    choices: tuple[str, ...] | None = None
    range: Range | None = None

    def parse(self, text: str, family: str) -> Any:
        """Convert the text after ``name=`` to this parameter's type, or raise :class:`SpecError`."""
        where = f"{family}: parameter '{self.name}'"
        raw = text.strip()
        if self.choices is not None:
            if raw not in self.choices:
                raise SpecError(f"{where} must be one of {', '.join(self.choices)}, got '{clip(raw)}'"
                                f"{did_you_mean(raw, self.choices)}")
            return raw
        if self.type is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise SpecError(f"{where} must be true or false, got '{clip(raw)}'")
        if self.type is int:
            try:
                value: Any = int(raw)
            except ValueError:
                raise SpecError(f"{where} must be an integer, got '{clip(raw)}'") from None
            return self.check(value, where)
        if self.type is float:
            try:
                value = float(raw)
            except ValueError:
                raise SpecError(f"{where} must be a number (or inf), got '{clip(raw)}'") from None
            if math.isnan(value):
                raise SpecError(f"{where} must not be nan")
            return self.check(value, where)
        if not raw and self.default != "":  # an empty default means "none", so it must round-trip
            raise SpecError(f"{where} must not be empty")
        return raw

    def check(self, value: Any, where: str) -> Any:
        """``value`` if the declared range allows it, else a :class:`SpecError` saying what is allowed."""
        if self.range is not None and not self.range.contains(value):
            raise SpecError(f"{where} must be {self.range.describe()}, got {clip(self.format(value), 40)}")
        return value

    def format(self, value: Any) -> str:
        """Render a value so that :meth:`parse` gives it back."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            text = repr(value)
            return text[:-2] if text.endswith(".0") else text
        return str(value)

    def describe(self) -> str:
        kind = "|".join(self.choices) if self.choices else self.type.__name__
        if self.range is not None:
            kind += f" {self.range.describe()}"
        return f"{self.name}={self.format(self.default)} ({kind})"


def params_from_signature(factory: Any, reserved: frozenset[str]) -> tuple[Param, ...]:
    """Read a factory's defaulted keyword parameters as spec parameters."""
    if isinstance(factory, type):
        # A subclass that forwards **kwargs to its base (e.g. a Probe's schedule) exposes both signatures.
        targets = []
        for klass in factory.__mro__:
            if "__init__" not in vars(klass) or klass is object:
                continue
            targets.append(klass.__init__)
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD
                       for p in inspect.signature(klass.__init__).parameters.values()):
                break
    else:
        targets = [factory]
    params: list[Param] = []
    for target in targets:
        params += [p for p in _params_of(target, reserved) if p.name not in {q.name for q in params}]
    return tuple(params)


def _params_of(target: Any, reserved: frozenset[str]) -> list[Param]:
    try:
        hints = typing.get_type_hints(getattr(target, "func", target), include_extras=True)  # partials too
    except Exception:  # unresolvable forward references: fall back to the defaults' types
        hints = {}
    params = []
    for p in inspect.signature(target).parameters.values():
        if p.name in reserved or p.default is inspect.Parameter.empty:
            continue
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        hint = hints.get(p.name)
        bounds = None
        if typing.get_origin(hint) is typing.Annotated:
            hint, *extras = typing.get_args(hint)
            bounds = next((e for e in extras if isinstance(e, Range)), None)
        choices = None
        if typing.get_origin(hint) is typing.Literal:
            choices = tuple(str(c) for c in typing.get_args(hint))
            ptype: type = str
        elif hint in (int, float, bool, str):
            ptype = hint
        elif p.default is not None and type(p.default) in (int, float, bool, str):
            ptype = type(p.default)
        else:
            continue  # not expressible in a spec string (e.g. a callable): leave it to Python callers
        default = float(p.default) if ptype is float and isinstance(p.default, int) else p.default
        params.append(Param(p.name, ptype, default, choices, bounds if ptype in (int, float) else None))
    return params


@dataclass(frozen=True)
class Spec:
    """A parsed, fully resolved spec: the family and every parameter's value (defaults filled)."""

    family: str
    args: tuple[tuple[str, Any], ...]
    positional: str | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.args)

    def canonical(self) -> str:
        """The spec string with every parameter spelled out; ``parse(s.canonical()) == s``."""
        parts = []
        head = self.family
        for name, value in self.args:
            text = Param(name, type(value), value).format(value)
            if name == self.positional:
                head = f"{self.family}:{text}"
            else:
                parts.append(f"{name}={text}")
        return ",".join([head, *parts])

    def short(self) -> str:
        """The spec with only its positional value, e.g. ``lp:inf`` (for run names and tables)."""
        value = self.kwargs.get(self.positional) if self.positional else None
        return self.family if value is None else f"{self.family}:{Param('', type(value), value).format(value)}"

    def __str__(self) -> str:
        return self.canonical()


def split_spec(text: str) -> tuple[str, str | None, list[tuple[str, str]]]:
    """Split ``family[:positional][,key=value...]`` into its pieces without typing the values."""
    text = text.strip()
    if not text:
        raise SpecError("empty spec")
    if len(text) > MAX_SPEC_CHARS:
        raise SpecError(f"spec '{clip(text, 60)}' is {len(text)} characters long; a spec is a name and a few "
                        f"parameters (at most {MAX_SPEC_CHARS} characters)")
    if ":" in text.split(",", 1)[0]:
        family, rest = text.split(":", 1)
        items = rest.split(",")
    else:
        family, *items = text.split(",")
        items = items
    family = family.strip()
    if not family:
        raise SpecError(f"spec '{text}' has no family name")
    positional = None
    pairs: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        item = item.strip()
        if not item:
            raise SpecError(f"spec '{text}' has an empty item")
        if "=" in item:
            key, value = item.split("=", 1)
            pairs.append((key.strip(), value.strip()))
        elif i == 0 and ":" in text.split(",", 1)[0]:
            positional = item
        else:
            raise SpecError(f"spec '{text}': '{item}' is not key=value")
    return family, positional, pairs


def resolve(family: str, positional_text: str | None, pairs: list[tuple[str, str]],
            params: tuple[Param, ...], positional: str | None) -> Spec:
    """Type the values of a split spec against a factory's parameters and fill the defaults."""
    by_name = {p.name: p for p in params}
    values: dict[str, Any] = {}
    if positional_text is not None:
        if positional is None:
            raise SpecError(
                f"{family} takes no positional value (got ':{positional_text}'); "
                f"parameters: {', '.join(p.describe() for p in params) or 'none'}"
            )
        values[positional] = by_name[positional].parse(positional_text, family)
    for key, text in pairs:
        if key not in by_name:
            valid = ", ".join(p.describe() for p in params) or "none"
            raise SpecError(f"{family} has no parameter '{key}'{did_you_mean(key, by_name)}; valid: {valid}")
        if key in values:
            raise SpecError(f"{family}: parameter '{key}' given twice")
        values[key] = by_name[key].parse(text, family)
    args = tuple((p.name, values.get(p.name, p.default)) for p in params)
    return Spec(family, args, positional)
