"""Variant specifications: which tuning vectors, how strongly, where, and how they merge.

A variant is ``base + merge(αᵢ·τᵢ)`` over the components of a ``Spec``. The same spec has three spellings,
all documented in docs/spec-grammar.md:

- text, used as the OpenAI ``model`` field: ``ties(density=0.5)/medical@mlp[0:12]:0.8+math:-0.4``
- a plain JSON mapping: ``{"medical": 0.8, "math@mlp": 0.4}``
- a full JSON form: ``{"method": "ties", "density": 0.5, "components": [{"vector": "medical", ...}]}``

A ``Spec`` is always structurally valid and in canonical order, so equal specs compare equal, print the same
canonical text and share a digest. Checks that need the server's context (which vectors exist, coefficient
bound, model depth) live in ``Spec.validate``. Turning a spec into tensors is ``tunevec.steering.delta``; this
module imports no torch, so a server can parse requests without it.

Requests come from clients that may be hostile, so reading a spec is bounded before any work is done
(``MAX_SPEC_CHARS``, ``MAX_PARSED_COMPONENTS``, ``MAX_LAYER_INDEX``), never recurses into its input, and every
malformed input, whatever its type or size, raises ``TunevecError`` whose message quotes at most a short excerpt.
``Spec.from_json`` is the one entry point for a request's value (a string, a plain or a full mapping).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from tunevec.core.errors import NotFoundError, TunevecError
from tunevec.core.roles import ROLES, classify
from tunevec.steering.merge import METHODS, PARAM_NAMES, MergeMethod

# --- limits: every one is checked before the work it bounds ------------------------------------------------------

# Longest spec text accepted, checked before parsing starts. Also the most characters the keys of a plain JSON
# mapping may add up to, and the longest vector name: a name that no spec text can hold is no vector name.
MAX_SPEC_CHARS = 16_384
# Most components one spec may have: text components, plain-mapping keys or full-form components, counted before
# any Component is built, so a hostile request stays cheap. The server's own, much smaller limit is
# Spec.validate(max_components=...).
MAX_PARSED_COMPONENTS = 256
# Layer indices must be below this (in text, longer digit strings are refused before int() sees them). Real models
# have at most a few hundred layers; validate(num_layers=...) applies the model's own depth.
MAX_LAYER_INDEX = 2**31
# How deep a valid JSON steering value nests: {"components": [{"layers": [0, 12]}]}. A server may refuse deeper
# JSON before decoding it; from_json itself never recurses, so deeper input only gets a TunevecError here.
STEERING_JSON_DEPTH = 4
# Characters of client input an error message quotes, at most (longer input is cut, with an ellipsis).
_ECHO_CHARS = 80

# Scope -> the tunevec.core.roles roles it covers; None means every tensor, whatever its role.
SCOPES: dict[str, frozenset[str] | None] = {
    "all": None,
    "attention": frozenset({"attention"}),
    "mlp": frozenset({"mlp"}),
    "embeddings": frozenset({"embedding", "head"}),
    "norm": frozenset({"norm"}),
}
# Scopes whose tensors sit outside the decoder layers, so a layer range would select nothing.
_LAYERLESS_SCOPES = frozenset({"embeddings"})

# A vector name as the text grammar reads it. Libraries should refuse other names so every vector is addressable.
# Names start with a letter so no name reads as a number (lm-eval's model_args turn "2" into an int).
VECTOR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_WORD = re.compile(r"[A-Za-z_]+")
# ASCII digits only: \d would also take other scripts' digits, which the canonical text never writes.
_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[0-9]+")
_SPACE = re.compile(r"\s*")
_TOKEN = re.compile(r"[A-Za-z0-9_.\-]+|\S")  # what an error message quotes as "got ..."
_NOT_FINITE = re.compile(r"[+-]?(?:nan|inf(?:inity)?)", re.IGNORECASE)
_NO_STOP = 2**63  # sort key for an open-ended layer range


def format_number(x: float) -> str:
    """Shortest text that round-trips to ``x``: ``1``, ``0.8``, ``-0.25``, ``1e-05``, ``1e20``.

    Integral values lose their ``.0`` and exponents lose their ``+`` (``+`` separates components in text).
    """
    text = repr(float(x))
    if text.endswith(".0"):
        text = text[:-2]
    return text.replace("e+", "e")


def _is_number(value: object) -> bool:
    # bool is an int subclass; JSON true/false as a coefficient is a mistake, not 1/0.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _quote(value: object, limit: int = _ECHO_CHARS // 2) -> str:
    """A client's value, rendered short and safely for an error message.

    Never the whole of a long string, never ``str()`` of a huge int (Python refuses more than 4300 digits) and
    never ``repr()`` of a container (a deeply nested one would raise RecursionError): those are described instead.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}… ({len(value)} characters)"
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        if abs(value) < 10**limit:
            return repr(value)
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} items"
    if isinstance(value, Mapping):
        return f"a mapping of {len(value)} keys"
    return f"a {type(value).__name__}"


def _excerpt(text: str, pos: int) -> str:
    """At most ``_ECHO_CHARS`` characters of ``text`` around ``pos``, quoted, with … where it was cut."""
    if len(text) <= _ECHO_CHARS:
        return repr(text)
    start = max(0, min(pos - _ECHO_CHARS // 2, len(text) - _ECHO_CHARS))
    stop = start + _ECHO_CHARS
    return repr(("…" if start else "") + text[start:stop] + ("…" if stop < len(text) else ""))


@dataclass(frozen=True)
class Component:
    """One term αᵢ·τᵢ of a variant, restricted to a scope and optionally a half-open decoder-layer range."""

    vector: str
    alpha: float = 1.0
    scope: str = "all"
    layers: tuple[int, int | None] | None = None  # [start, stop); stop None = to the last layer

    def __post_init__(self) -> None:
        if (
            not isinstance(self.vector, str)
            or len(self.vector) > MAX_SPEC_CHARS
            or not VECTOR_NAME.fullmatch(self.vector)
        ):
            raise TunevecError(
                f"invalid vector name {_quote(self.vector)}; a name starts with a letter or '_' and contains "
                f"only letters, digits, '_', '.' and '-' (at most {MAX_SPEC_CHARS} characters)"
            )
        if not _is_number(self.alpha):
            raise TunevecError(
                f"coefficient of {_quote(self.vector)} must be a number, got {_quote(self.alpha)}"
            )
        try:
            alpha = float(self.alpha)  # a JSON integer of 400 digits overflows here
        except OverflowError:
            alpha = math.inf
        if not math.isfinite(alpha):
            raise TunevecError(
                f"coefficient of {_quote(self.vector)} must be a finite number, got {_quote(self.alpha)}"
            )
        object.__setattr__(self, "alpha", alpha + 0.0)  # -0.0 -> 0.0, so they print (and hash) the same
        if not isinstance(self.scope, str) or self.scope not in SCOPES:
            raise TunevecError(f"unknown scope {_quote(self.scope)}; use one of {', '.join(SCOPES)}")
        if self.layers is not None:
            object.__setattr__(self, "layers", self._check_layers(self.layers))

    def _check_layers(self, layers: object) -> tuple[int, int | None]:
        if not isinstance(layers, tuple | list) or len(layers) != 2:
            raise TunevecError(
                f"layer range of {_quote(self.vector)} must be [start, stop], got {_quote(layers)}"
            )
        start, stop = layers
        for index in (start, stop):
            if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
                raise TunevecError(
                    f"layer indices of {_quote(self.vector)} must be integers, got {_quote(index)}"
                )
            if index is not None and index >= MAX_LAYER_INDEX:
                raise TunevecError(
                    f"layer index {_quote(index)} of {_quote(self.vector)} is too large; indices are below "
                    f"{MAX_LAYER_INDEX}"
                )
        if start is None:
            start = 0
        if start < 0 or (stop is not None and stop < 0):
            raise TunevecError(
                f"layer range [{_quote(start)}:{'' if stop is None else _quote(stop)}] of {_quote(self.vector)} "
                "is negative; layer indices count from 0 (no negative indexing)"
            )
        if stop is not None and stop <= start:
            raise TunevecError(
                f"layer range [{start}:{stop}] of {_quote(self.vector)} is empty; the range is half-open, so stop "
                "must be greater than start"
            )
        if self.scope in _LAYERLESS_SCOPES:
            raise TunevecError(
                f"scope {self.scope!r} has no layers (embedding and head tensors sit outside the decoder "
                f"layers); drop the layer range from {_quote(self.vector)}"
            )
        return (start, stop)

    @property
    def selector(self) -> str:
        """The component's text without its coefficient: ``medical@mlp[0:12]``."""
        text = self.vector if self.scope == "all" else f"{self.vector}@{self.scope}"
        if self.layers is not None:
            start, stop = self.layers
            text += f"[{start}:{'' if stop is None else stop}]"
        return text

    def __str__(self) -> str:
        return self.selector if self.alpha == 1.0 else f"{self.selector}:{format_number(self.alpha)}"

    def _sort_key(self) -> tuple[str, str, int, int]:
        if self.layers is None:
            return (self.vector, self.scope, -1, -1)
        start, stop = self.layers
        return (self.vector, self.scope, start, _NO_STOP if stop is None else stop)

    def applies_to(self, tensor_name: str) -> bool:
        """Whether this component touches the checkpoint tensor ``tensor_name`` (role and layer, via roles.classify).

        With a layer range, tensors outside the decoder layers (embeddings, final norm, head) never match.
        """
        role = classify(tensor_name)
        roles = SCOPES[self.scope]
        if roles is not None and role.role not in roles:
            return False
        if self.layers is None:
            return True
        if role.layer is None:
            return False
        start, stop = self.layers
        return role.layer >= start and (stop is None or role.layer < stop)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vector": self.vector, "alpha": self.alpha, "scope": self.scope}
        if self.layers is not None:
            out["layers"] = list(self.layers)
        return out


def _coverage(c: Component) -> tuple[int, int]:
    """The layer positions a component can touch, as a half-open interval; -1 stands for the tensors outside the
    decoder layers (embeddings, final norm, head). No range: [-1, ∞), or [-1, 0) for a layerless scope."""
    if c.layers is None:
        return (-1, 0 if c.scope in _LAYERLESS_SCOPES else _NO_STOP)
    start, stop = c.layers
    return (start, _NO_STOP if stop is None else stop)


def _first_conflict(components: Sequence[Component]) -> tuple[int, str] | None:
    """(index of the later component, why) for a pair of components that cannot share a spec, or None.

    A vector may appear again only with a disjoint scope. Two components of one vector conflict when their scopes
    share a role and their coverages (``_coverage``) intersect. Grouping the components by (vector, role) and
    sweeping each group's sorted intervals finds that in O(n log n); comparing every pair would cost O(n²) on a
    hostile spec at the component limit.
    """
    first_at: dict[tuple, int] = {}
    for i, c in enumerate(components):
        key = (c.vector, c.scope, c.layers)
        if key in first_at:
            a = components[first_at[key]]
            return i, (
                f"duplicate component {_quote(a.selector)} (as {_quote(str(a))} and {_quote(str(c))}); "
                "give each vector and scope one coefficient"
            )
        first_at[key] = i
    groups: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(components):
        for role in ROLES if SCOPES[c.scope] is None else SCOPES[c.scope]:
            groups.setdefault((c.vector, role), []).append(i)
    cover = [_coverage(c) for c in components]
    found: tuple[int, int] | None = None  # (later index, earlier index)
    for members in groups.values():
        members.sort(key=cover.__getitem__)
        reach = members[0]  # the member whose coverage ends furthest so far
        for i in members[1:]:
            if cover[i][0] < cover[reach][1]:
                pair = (max(i, reach), min(i, reach))
                found = pair if found is None else min(found, pair)
                break
            if cover[i][1] > cover[reach][1]:
                reach = i
    if found is None:
        return None
    b, a = components[found[0]], components[found[1]]
    return found[0], (
        f"components {_quote(str(a))} and {_quote(str(b))} apply {_quote(a.vector)} twice to the same "
        "tensors; a vector may repeat only with disjoint scopes"
    )


def _check_params(record: MergeMethod, given: Mapping[str, object]) -> tuple[tuple[str, int | float], ...]:
    """The method's parameters in declared order, defaults filled in; TunevecError for unknown or bad values."""
    for key in given:
        if record.param(key) is None:
            raise TunevecError(
                f"method {record.name!r} takes no parameter {_quote(key)} (it takes {record.takes()})"
            )
    out = []
    for param in record.params:
        value = given.get(param.name, param.default)
        if not param.accepts(value):
            raise TunevecError(f"{param.requirement}, got {_quote(value)}")
        out.append((param.name, param.convert(value)))
    return tuple(out)


@dataclass(frozen=True)
class Spec:
    """A variant: base + merge over components of αᵢ·τᵢ, with a merge method and its parameters.

    ``params`` may be given as a mapping; construction checks them against the method's registry record
    (``tunevec.steering.merge.METHODS``), fills in its defaults and stores them as ``(name, value)`` pairs in the
    method's declared order. Components are sorted by (vector, scope, layers), so two specs that mean the same
    thing are equal, print the same ``canonical()`` and share a ``digest()``.
    """

    components: tuple[Component, ...]
    method: str = "linear"
    params: tuple[tuple[str, int | float], ...] | Mapping[str, int | float] = ()

    def __post_init__(self) -> None:
        components = self.components
        if not isinstance(components, tuple | list):
            raise TunevecError(
                f"spec components must be a list of Component objects, got {_quote(components)}"
            )
        if not components:
            raise TunevecError("empty spec; name at least one vector, e.g. 'medical' or 'medical:0.5'")
        if len(components) > MAX_PARSED_COMPONENTS:
            raise TunevecError(
                f"spec has {len(components)} components; at most {MAX_PARSED_COMPONENTS} are accepted"
            )
        for c in components:
            if not isinstance(c, Component):
                raise TunevecError(f"spec components must be Component objects, got {_quote(c)}")
        conflict = _first_conflict(components)
        if conflict:
            raise TunevecError(conflict[1])
        object.__setattr__(self, "components", tuple(sorted(components, key=Component._sort_key)))
        record = METHODS.get(self.method) if isinstance(self.method, str) else None
        if record is None:
            raise TunevecError(f"unknown method {_quote(self.method)}; use one of {', '.join(METHODS)}")
        given = self.params
        if not isinstance(given, Mapping):
            if not isinstance(given, tuple | list) or not all(
                isinstance(p, tuple | list) and len(p) == 2 for p in given
            ):
                raise TunevecError(f"spec params must be a mapping of name to value, got {_quote(given)}")
            given = dict(given)
        object.__setattr__(self, "params", _check_params(record, given))

    @property
    def merge_method(self) -> MergeMethod:
        """The method's registry record (its parameters and its function)."""
        return METHODS[self.method]

    def param(self, name: str) -> int | float:
        """One parameter's value (defaults filled in); KeyError if the method has no such parameter."""
        return dict(self.params)[name]

    # --- spellings -------------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> Spec:
        """Parse the text form (docs/spec-grammar.md). Raises TunevecError naming the token and its column.

        Text longer than ``MAX_SPEC_CHARS`` is refused before parsing starts.
        """
        if not isinstance(text, str):
            raise TunevecError(f"a steering spec must be a string, got {type(text).__name__}")
        if len(text) > MAX_SPEC_CHARS:
            raise TunevecError(
                f"steering spec is {len(text)} characters long; at most {MAX_SPEC_CHARS} are accepted"
            )
        return _Parser(text).spec()

    def canonical(self) -> str:
        """The canonical text: method prefix with every parameter (omitted for linear), components sorted."""
        body = "+".join(str(c) for c in self.components)
        if self.method == "linear":
            return body
        params = ";".join(f"{key}={_param_text(value)}" for key, value in self.params)
        return f"{self.method}({params})/{body}"

    def __str__(self) -> str:
        return self.canonical()

    @classmethod
    def from_json(cls, obj: object) -> Spec:
        """Read a request's steering value: text, a plain mapping, or the full form (docs/spec-grammar.md).

        Bounded before any component is built: a mapping may have at most ``MAX_PARSED_COMPONENTS`` keys, a
        plain mapping's keys at most ``MAX_SPEC_CHARS`` characters in all, a full form at most
        ``MAX_PARSED_COMPONENTS`` components; a string is ``parse``d. Nested input is never recursed into.
        """
        if isinstance(obj, str):
            return cls.parse(obj)
        if not isinstance(obj, Mapping):
            raise TunevecError(
                "steering must be a string, a mapping of vector to coefficient, or a mapping with 'components'; "
                f"got {type(obj).__name__}"
            )
        if len(obj) > MAX_PARSED_COMPONENTS:
            raise TunevecError(
                f"steering mapping has {len(obj)} keys; at most {MAX_PARSED_COMPONENTS} are accepted"
            )
        for key in obj:
            if not isinstance(key, str):
                raise TunevecError(f"steering keys must be strings (vector names), got {_quote(key)}")
        if any(key in _FULL_FORM_KEYS for key in obj):
            return _from_full_json(obj)
        return _from_plain_json(obj)

    def to_json(self) -> dict[str, Any]:
        """The full JSON form, every parameter explicit, components in canonical order."""
        out: dict[str, Any] = {"method": self.method, **dict(self.params)}
        out["components"] = [c.to_json() for c in self.components]
        return out

    # --- identity ----------------------------------------------------------------------------------------------

    def digest(self) -> str:
        """sha256 of the canonical text, 64 hex digits (the first 16 make a readable id)."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()

    def int_id(self) -> int:
        """A stable id in [1, 2^31 − 1] for vLLM's ``lora_int_id``, derived from the digest.

        31 bits can collide (about 1 in 2 million for two given specs); whoever registers adapters must check
        that an id it reuses belongs to the same digest.
        """
        return int(self.digest()[:16], 16) % (2**31 - 1) + 1

    # --- checks ------------------------------------------------------------------------------------------------

    @property
    def vectors(self) -> tuple[str, ...]:
        """The vector names this spec needs, sorted, each once."""
        return tuple(sorted({c.vector for c in self.components}))

    def validate(
        self,
        available_vectors: Collection[str],
        *,
        max_components: int = 8,
        max_abs_alpha: float = 4.0,
        num_layers: int | None = None,
    ) -> Spec:
        """Check the spec against the server's context; returns self so calls chain. Raises TunevecError."""
        known = set(available_vectors)
        for c in self.components:
            if c.vector not in known:
                listing = ", ".join(sorted(known)) if known else "none (extract or register a vector first)"
                raise NotFoundError(
                    f"unknown vector {_quote(c.vector)} in component {_quote(str(c))}; known vectors: {listing}"
                )
        if len(self.components) > max_components:
            raise TunevecError(
                f"spec has {len(self.components)} components, at most {max_components} are allowed; drop some"
            )
        for c in self.components:
            if abs(c.alpha) > max_abs_alpha:
                raise TunevecError(
                    f"coefficient {format_number(c.alpha)} of component {_quote(str(c))} is outside "
                    f"[-{format_number(max_abs_alpha)}, {format_number(max_abs_alpha)}]; use a smaller magnitude"
                )
        if num_layers is not None:
            for c in self.components:
                if c.layers is None:
                    continue
                start, stop = c.layers
                if start >= num_layers or (stop is not None and stop > num_layers):
                    raise TunevecError(
                        f"layer range of component {_quote(str(c))} goes beyond the model's {num_layers} layers "
                        f"(valid indices 0..{num_layers - 1}, stop at most {num_layers})"
                    )
        return self


def _param_text(value: int | float) -> str:
    return str(value) if isinstance(value, int) else format_number(value)


# --- JSON ------------------------------------------------------------------------------------------------------

_FULL_FORM_KEYS = frozenset({"method", "components", *PARAM_NAMES})
_COMPONENT_KEYS = ("vector", "alpha", "scope", "layers")


def _unknown_keys(obj: Mapping[Any, Any], allowed: Collection[str]) -> str:
    """The first three keys of ``obj`` not in ``allowed``, quoted short, for a message ('' if none).

    Counting needs no pass over a huge mapping: everything but the allowed keys present is unknown.
    """
    count = len(obj) - sum(1 for key in allowed if key in obj)
    if not count:
        return ""
    shown = []
    for key in obj:
        if not (isinstance(key, str) and key in allowed):
            shown.append(_quote(key))
            if len(shown) == 3:
                break
    return ", ".join(shown) + (f" and {count - 3} more" if count > 3 else "")


def _from_full_json(obj: Mapping[str, Any]) -> Spec:
    unknown = _unknown_keys(obj, _FULL_FORM_KEYS)
    if unknown:
        raise TunevecError(
            f"unknown steering key(s) {unknown} in the full form; "
            f"allowed: {', '.join(sorted(_FULL_FORM_KEYS))} (vector names go inside 'components')"
        )
    items = obj.get("components")
    if not isinstance(items, list | tuple):
        raise TunevecError(f"steering 'components' must be a list of components, got {_quote(items)}")
    if len(items) > MAX_PARSED_COMPONENTS:
        raise TunevecError(
            f"steering 'components' has {len(items)} items; at most {MAX_PARSED_COMPONENTS} are accepted"
        )
    method = obj.get("method", "linear")
    if not isinstance(method, str):
        raise TunevecError(f"steering 'method' must be a string, got {_quote(method)}")
    components = []
    for i, item in enumerate(items):
        where = f"components[{i}]"
        if not isinstance(item, Mapping):
            raise TunevecError(f"steering {where} must be a mapping with 'vector', got {_quote(item)}")
        unknown = _unknown_keys(item, _COMPONENT_KEYS)
        if unknown:
            raise TunevecError(
                f"unknown key(s) {unknown} in steering {where}; allowed: {', '.join(_COMPONENT_KEYS)}"
            )
        if "vector" not in item:
            raise TunevecError(f"steering {where} has no 'vector'; name the tuning vector it uses")
        try:
            components.append(
                Component(
                    vector=item["vector"],
                    alpha=item.get("alpha", 1.0),
                    scope=item.get("scope", "all"),
                    layers=item.get("layers"),
                )
            )
        except TunevecError as e:
            raise TunevecError(f"steering {where}: {e}") from None
    params = {key: obj[key] for key in PARAM_NAMES if key in obj}
    return Spec(tuple(components), method=method, params=params)


def _from_plain_json(obj: Mapping[str, Any]) -> Spec:
    total = sum(len(key) for key in obj)
    if total > MAX_SPEC_CHARS:
        raise TunevecError(
            f"steering keys add up to {total} characters; at most {MAX_SPEC_CHARS} are accepted"
        )
    components = []
    for key, value in obj.items():
        selector = _Parser(key, what="steering key").selector_only()
        if not _is_number(value):
            raise TunevecError(
                f"steering coefficient for {_quote(key)} must be a number, got {_quote(value)}"
            )
        try:
            components.append(Component(selector.vector, value, selector.scope, selector.layers))
        except TunevecError as e:
            raise TunevecError(f"steering key {_quote(key)}: {e}") from None
    return Spec(tuple(components))


# --- text ------------------------------------------------------------------------------------------------------


class _Parser:
    """Recursive descent over the grammar in docs/spec-grammar.md; whitespace between tokens is ignored.

    Its depth is fixed by the grammar (spec > component > selector > layers), not by the input.
    """

    def __init__(self, text: str, what: str = "steering spec"):
        self.text = text
        self.what = what
        self.pos = 0

    def fail(self, message: str, pos: int | None = None) -> NoReturn:
        at = self.pos if pos is None else pos
        raise TunevecError(f"invalid {self.what} {_excerpt(self.text, at)} at column {at + 1}: {message}")

    def peek(self) -> str:
        self.pos = _SPACE.match(self.text, self.pos).end()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def found(self) -> str:
        if not self.peek():
            return "end of text"
        return _quote(_TOKEN.match(self.text, self.pos).group())

    def take(self, char: str) -> bool:
        if self.peek() == char:
            self.pos += 1
            return True
        return False

    def expect(self, char: str, context: str) -> None:
        if not self.take(char):
            self.fail(f"expected {char!r} {context}, got {self.found()}")

    def match(self, pattern: re.Pattern[str]) -> str | None:
        self.peek()
        m = pattern.match(self.text, self.pos)
        if m is None:
            return None
        self.pos = m.end()
        return m.group()

    # spec = [ method "/" ] component { "+" component }
    def spec(self) -> Spec:
        if not self.peek():
            self.fail("empty spec; name at least one vector, e.g. 'medical' or 'medical:0.5'")
        start = self.pos
        method, params = "linear", {}
        word = self.match(VECTOR_NAME)
        if word is not None and self.peek() in ("(", "/"):
            method = word
            if method not in METHODS:
                self.fail(f"unknown method {_quote(word)}; use one of {', '.join(METHODS)}", start)
            if self.take("("):
                params = self.params(METHODS[method])
            self.expect("/", "after the method")
        else:
            self.pos = start
        parsed = [self.component()]
        while self.take("+"):
            if len(parsed) >= MAX_PARSED_COMPONENTS:
                self.fail(f"too many components; at most {MAX_PARSED_COMPONENTS} are accepted")
            parsed.append(self.component())
        if self.peek():
            hint = ""
            if self.text[self.pos - 1].isspace():
                hint = " (a '+' in a URL query decodes to a space; percent-encode it as %2B)"
            self.fail(f"unexpected {self.found()}; expected '+' or the end of the spec{hint}")
        conflict = _first_conflict([c for c, _ in parsed])
        if conflict:
            index, problem = conflict
            self.fail(problem, parsed[index][1])
        try:
            return Spec(tuple(c for c, _ in parsed), method=method, params=params)
        except TunevecError as e:
            self.fail(str(e), start)

    # params = "(" [ param { ( ";" | "," ) param } ] ")" ;  param = name "=" value
    def params(self, record: MergeMethod) -> dict[str, float | int]:
        params: dict[str, float | int] = {}
        if self.take(")"):
            return params
        while True:
            self.peek()
            key_pos = self.pos
            key = self.match(_WORD)
            if key is None:
                self.fail(f"expected a parameter name, got {self.found()}")
            param = record.param(key)
            if param is None:
                self.fail(
                    f"unknown parameter {_quote(key)} for method {record.name!r} (it takes {record.takes()})",
                    key_pos,
                )
            if key in params:
                self.fail(f"parameter {key!r} given twice", key_pos)
            self.expect("=", f"after parameter {key!r}")
            self.peek()
            value_pos = self.pos
            value = self.integer(key) if param.type is int else self.number(key)
            if not param.accepts(value):
                self.fail(f"{param.requirement}, got {_quote(value)}", value_pos)
            params[key] = value
            if self.take(")"):
                return params
            if not (self.take(";") or self.take(",")):
                self.fail(f"expected ';' or ')' after parameter {key!r}, got {self.found()}")

    # component = name ( selector [ ":" alpha ] | ":" alpha [ selector ] | )
    def component(self) -> tuple[Component, int]:
        self.peek()
        start = self.pos
        vector = self.match(VECTOR_NAME)
        if vector is None:
            self.fail(f"expected a vector name, got {self.found()}")
        scope, layers, alpha = "all", None, 1.0
        selector_pos = start  # where a bad layer range is reported
        if self.peek() in ("@", "["):
            selector_pos = self.pos
            scope, layers = self.selector()
            if self.take(":"):
                alpha = self.number("coefficient")
        elif self.take(":"):
            alpha = self.number("coefficient")
            if self.peek() in ("@", "["):
                selector_pos = self.pos
                scope, layers = self.selector()
        if self.peek() in ("@", "[", ":"):
            self.fail(
                f"unexpected {self.found()} in component {_quote(vector)}; write vector@scope[start:stop]:alpha"
            )
        try:
            return Component(vector, alpha, scope, layers), start
        except TunevecError as e:
            self.fail(str(e), selector_pos)

    # selector = "@" scope [ layers ] | layers
    def selector(self) -> tuple[str, tuple[int, int | None] | None]:
        scope = "all"
        if self.take("@"):
            self.peek()
            scope_pos = self.pos
            scope = self.match(_WORD)
            if scope is None:
                self.fail(f"expected a scope after '@' ({', '.join(SCOPES)}), got {self.found()}")
            if scope not in SCOPES:
                self.fail(f"unknown scope {_quote(scope)}; use one of {', '.join(SCOPES)}", scope_pos)
        layers = self.layers() if self.peek() == "[" else None
        return scope, layers

    # layers = "[" [ int ] ":" [ int ] "]" | "[" int "]"
    def layers(self) -> tuple[int, int | None]:
        self.expect("[", "to open a layer range")
        start = self.layer_index()
        if self.take(":"):
            stop = self.layer_index()
            start = 0 if start is None else start
        else:
            if start is None:
                self.fail(f"expected a layer index or range like [0:12], got {self.found()}")
            stop = start + 1
        self.expect("]", "to close the layer range")
        return start, stop

    def layer_index(self) -> int | None:
        if self.peek() == "-":
            self.fail("layer indices count from 0 (no negative indexing); write a range like [0:12]")
        if not _INTEGER.match(self.text, self.pos):
            return None
        return self.integer("layer index", at_most=MAX_LAYER_INDEX - 1)

    def number(self, what: str) -> float:
        self.peek()
        pos = self.pos
        text = self.match(_NUMBER)
        if text is None:
            word = _NOT_FINITE.match(self.text, pos)
            if word:
                self.fail(f"{what} must be a finite number, got {word.group()!r}", pos)
            self.fail(f"expected a number for the {what}, got {self.found()}")
        value = float(text)  # float() has no digit limit; 400 digits give inf, refused below
        if not math.isfinite(value):
            self.fail(f"{what} must be a finite number, got {_quote(text)} (too large)", pos)
        return value

    def integer(self, what: str, at_most: int = 2**64) -> int:
        """Digits as an int; more digits than ``at_most`` has are refused before ``int()`` sees them (Python's
        int() refuses more than 4300 digits with a ValueError, and converting long digit strings is quadratic)."""
        self.peek()
        pos = self.pos
        text = self.match(_INTEGER)
        if text is None or self.peek() in (".", "e", "E"):
            self.pos = pos  # quote the whole offending token, not what follows its digits
            self.fail(f"{what} must be a non-negative integer, got {self.found()}")
        digits = text.lstrip("0") or "0"
        if len(digits) > len(str(at_most)) or int(digits) > at_most:
            self.fail(f"{what} {_quote(text)} is too large (at most {at_most})", pos)
        return int(digits)

    def selector_only(self) -> Component:
        """A plain-JSON key: a component without a coefficient (the coefficient is the value)."""
        vector = self.match(VECTOR_NAME)
        if vector is None:
            self.fail(f"expected a vector name, got {self.found()}")
        scope, layers = self.selector() if self.peek() in ("@", "[") else ("all", None)
        if self.peek() == ":":
            self.fail("put the coefficient in the value, not in the key")
        if self.peek():
            self.fail(f"unexpected {self.found()}; a key is vector[@scope][[start:stop]]")
        try:
            return Component(vector, 1.0, scope, layers)
        except TunevecError as e:
            self.fail(str(e), 0)
