"""Variant specifications: which tuning vectors, how strongly, where, and how they merge.

A variant is ``base + merge(αᵢ·τᵢ)`` over the components of a ``Spec``. The same spec has three spellings,
all documented in docs/spec-grammar.md:

- text, used as the OpenAI ``model`` field: ``ties(density=0.5)/medical@mlp[0:12]:0.8+math:-0.4``
- a plain JSON mapping: ``{"medical": 0.8, "math@mlp": 0.4}``
- a full JSON form: ``{"method": "ties", "density": 0.5, "components": [{"vector": "medical", ...}]}``

A ``Spec`` is always structurally valid and in canonical order, so equal specs compare equal, print the same
canonical text and share a digest. Checks that need the server's context (which vectors exist, coefficient
bound, model depth) live in ``Spec.validate``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from tunevec.steering.merge import METHODS, dare_generator, merge_dare, merge_linear, merge_ties

from tunevec.core.errors import NotFoundError, TunevecError
from tunevec.core.roles import classify

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

# The text parser refuses more components than this before any pairwise check, so a hostile request stays cheap.
# The server's own, much smaller limit is Spec.validate(max_components=...).
MAX_PARSED_COMPONENTS = 256

# A vector name as the text grammar reads it. Libraries should refuse other names so every vector is addressable.
# Names start with a letter so no name reads as a number (lm-eval's model_args turn "2" into an int).
VECTOR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_WORD = re.compile(r"[A-Za-z_]+")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"\d+")
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


@dataclass(frozen=True)
class Component:
    """One term αᵢ·τᵢ of a variant, restricted to a scope and optionally a half-open decoder-layer range."""

    vector: str
    alpha: float = 1.0
    scope: str = "all"
    layers: tuple[int, int | None] | None = None  # [start, stop); stop None = to the last layer

    def __post_init__(self) -> None:
        if not isinstance(self.vector, str) or not VECTOR_NAME.fullmatch(self.vector):
            raise TunevecError(
                f"invalid vector name {self.vector!r}; a name starts with a letter or '_' and contains "
                "only letters, digits, '_', '.' and '-'"
            )
        if not _is_number(self.alpha):
            raise TunevecError(f"coefficient of {self.vector!r} must be a number, got {self.alpha!r}")
        alpha = float(self.alpha)
        if not math.isfinite(alpha):
            raise TunevecError(f"coefficient of {self.vector!r} must be a finite number, got {self.alpha!r}")
        object.__setattr__(self, "alpha", alpha + 0.0)  # -0.0 -> 0.0, so they print (and hash) the same
        if self.scope not in SCOPES:
            raise TunevecError(f"unknown scope {self.scope!r}; use one of {', '.join(SCOPES)}")
        if self.layers is not None:
            object.__setattr__(self, "layers", self._check_layers(self.layers))

    def _check_layers(self, layers: object) -> tuple[int, int | None]:
        if not isinstance(layers, tuple | list) or len(layers) != 2:
            raise TunevecError(f"layer range of {self.vector!r} must be [start, stop], got {layers!r}")
        start, stop = layers
        for index in (start, stop):
            if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
                raise TunevecError(f"layer indices of {self.vector!r} must be integers, got {index!r}")
        if start is None:
            start = 0
        if start < 0 or (stop is not None and stop < 0):
            raise TunevecError(
                f"layer range [{start}:{'' if stop is None else stop}] of {self.vector!r} is negative; "
                "layer indices count from 0 (no negative indexing)"
            )
        if stop is not None and stop <= start:
            raise TunevecError(
                f"layer range [{start}:{stop}] of {self.vector!r} is empty; the range is half-open, so stop "
                "must be greater than start"
            )
        if self.scope in _LAYERLESS_SCOPES:
            raise TunevecError(
                f"scope {self.scope!r} has no layers (embedding and head tensors sit outside the decoder "
                f"layers); drop the layer range from {self.vector!r}"
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


def _overlaps(a: Component, b: Component) -> bool:
    """Whether two scopes can select a common tensor (decided from the scopes alone, without a model)."""
    roles_a, roles_b = SCOPES[a.scope], SCOPES[b.scope]
    if roles_a is not None and roles_b is not None and not roles_a & roles_b:
        return False
    if a.layers is None and b.layers is None:
        return True
    if a.layers is None or b.layers is None:
        unranged = a if a.layers is None else b
        return unranged.scope not in _LAYERLESS_SCOPES
    (start_a, stop_a), (start_b, stop_b) = a.layers, b.layers
    return max(start_a, start_b) < min(
        _NO_STOP if stop_a is None else stop_a, _NO_STOP if stop_b is None else stop_b
    )


def _conflict(a: Component, b: Component) -> str | None:
    """Why two components cannot share a spec, or None. A vector may appear again only with a disjoint scope."""
    if a.vector != b.vector:
        return None
    if a.selector == b.selector:
        return (
            f"duplicate component {a.selector!r} (as {str(a)!r} and {str(b)!r}); "
            "give each vector and scope one coefficient"
        )
    if _overlaps(a, b):
        return (
            f"components {str(a)!r} and {str(b)!r} apply {a.vector!r} twice to the same tensors; "
            "a vector may repeat only with disjoint scopes"
        )
    return None


def _param_problem(key: str, value: object) -> str | None:
    """What is wrong with a method parameter's value, or None."""
    if key == "density" and (not _is_number(value) or not 0.0 < float(value) <= 1.0):
        return f"density must be a number in (0, 1] (the fraction of each vector kept), got {value!r}"
    if key == "seed" and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63):
        return f"seed must be an integer in [0, 2^63), got {value!r}"
    return None


@dataclass(frozen=True)
class Spec:
    """A variant: base + merge over components of αᵢ·τᵢ, with a merge method and its parameters.

    Construction fills in the method's default parameters and sorts components by (vector, scope, layers), so
    two specs that mean the same thing are equal, print the same ``canonical()`` and share a ``digest()``.
    """

    components: tuple[Component, ...]
    method: str = "linear"
    density: float | None = None  # ties, dare: fraction of each τ kept
    seed: int | None = None  # dare: with the tensor name, fixes the random mask

    def __post_init__(self) -> None:
        components = tuple(self.components)
        if not components:
            raise TunevecError("empty spec; name at least one vector, e.g. 'medical' or 'medical:0.5'")
        if len(components) > MAX_PARSED_COMPONENTS:
            raise TunevecError(
                f"spec has {len(components)} components; at most {MAX_PARSED_COMPONENTS} are accepted"
            )
        for c in components:
            if not isinstance(c, Component):
                raise TunevecError(f"spec components must be Component objects, got {c!r}")
        for i, a in enumerate(components):
            for b in components[i + 1 :]:
                problem = _conflict(a, b)
                if problem:
                    raise TunevecError(problem)
        object.__setattr__(self, "components", tuple(sorted(components, key=Component._sort_key)))
        self._check_method()

    def _check_method(self) -> None:
        if self.method not in METHODS:
            raise TunevecError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        declared = METHODS[self.method]
        for key in ("density", "seed"):
            value = getattr(self, key)
            if key not in declared:
                if value is not None:
                    takes = ", ".join(declared) if declared else "no parameters"
                    raise TunevecError(
                        f"method {self.method!r} takes no parameter {key!r} (it takes {takes})"
                    )
            elif value is None:
                object.__setattr__(self, key, declared[key])
        for key in declared:
            problem = _param_problem(key, getattr(self, key))
            if problem:
                raise TunevecError(problem)
        if self.density is not None:
            object.__setattr__(self, "density", float(self.density))

    # --- spellings -------------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> Spec:
        """Parse the text form (docs/spec-grammar.md). Raises TunevecError naming the token and its column."""
        if not isinstance(text, str):
            raise TunevecError(f"a steering spec must be a string, got {type(text).__name__}")
        return _Parser(text).spec()

    def canonical(self) -> str:
        """The canonical text: method prefix with every parameter (omitted for linear), components sorted."""
        body = "+".join(str(c) for c in self.components)
        if self.method == "linear":
            return body
        params = ";".join(f"{key}={self._param_text(key)}" for key in METHODS[self.method])
        return f"{self.method}({params})/{body}"

    def _param_text(self, key: str) -> str:
        value = getattr(self, key)
        return str(value) if isinstance(value, int) else format_number(value)

    def __str__(self) -> str:
        return self.canonical()

    @classmethod
    def from_json(cls, obj: object) -> Spec:
        """Read ``extra_body={"steering": ...}``: text, a plain mapping, or the full form (see module docstring)."""
        if isinstance(obj, str):
            return cls.parse(obj)
        if not isinstance(obj, Mapping):
            raise TunevecError(
                "steering must be a string, a mapping of vector to coefficient, or a mapping with 'components'; "
                f"got {type(obj).__name__}"
            )
        if _FULL_FORM_KEYS & obj.keys():
            return _from_full_json(obj)
        return _from_plain_json(obj)

    def to_json(self) -> dict[str, Any]:
        """The full JSON form, every parameter explicit, components in canonical order."""
        out: dict[str, Any] = {"method": self.method}
        for key in METHODS[self.method]:
            out[key] = getattr(self, key)
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

    # --- checks and application ----------------------------------------------------------------------------

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
                    f"unknown vector {c.vector!r} in component {str(c)!r}; known vectors: {listing}"
                )
        if len(self.components) > max_components:
            raise TunevecError(
                f"spec has {len(self.components)} components, at most {max_components} are allowed; drop some"
            )
        for c in self.components:
            if abs(c.alpha) > max_abs_alpha:
                raise TunevecError(
                    f"coefficient {format_number(c.alpha)} of component {str(c)!r} is outside "
                    f"[-{format_number(max_abs_alpha)}, {format_number(max_abs_alpha)}]; use a smaller magnitude"
                )
        if num_layers is not None:
            for c in self.components:
                if c.layers is None:
                    continue
                start, stop = c.layers
                if start >= num_layers or (stop is not None and stop > num_layers):
                    raise TunevecError(
                        f"layer range of component {str(c)!r} goes beyond the model's {num_layers} layers "
                        f"(valid indices 0..{num_layers - 1}, stop at most {num_layers})"
                    )
        return self

    def delta_for(self, name: str, taus: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The merged float32 delta for checkpoint tensor ``name``, or None if no component applies.

        ``taus`` maps vector name to that vector's τ for this tensor. A vector absent from ``taus`` counts as
        τ = 0 here (an artifact may omit tensors its tuning left unchanged). The merge runs over the components
        that apply to this tensor, in canonical order; DARE draws its masks from ``dare_generator(seed, name)``,
        so the result depends only on the spec and the inputs, not on streaming order or process.
        """
        parts = [
            (c.alpha, taus[c.vector]) for c in self.components if c.vector in taus and c.applies_to(name)
        ]
        if not parts:
            return None
        alphas = [alpha for alpha, _ in parts]
        tensors = [tau for _, tau in parts]
        if self.method == "ties":
            return merge_ties(tensors, alphas, self.density)
        if self.method == "dare":
            return merge_dare(tensors, alphas, self.density, dare_generator(self.seed, name))
        return merge_linear(tensors, alphas)


# --- JSON ------------------------------------------------------------------------------------------------------

_FULL_FORM_KEYS = frozenset({"method", "components", "density", "seed"})
_COMPONENT_KEYS = ("vector", "alpha", "scope", "layers")


def _from_full_json(obj: Mapping[str, Any]) -> Spec:
    unknown = sorted(set(obj) - _FULL_FORM_KEYS, key=str)
    if unknown:
        raise TunevecError(
            f"unknown steering key(s) {', '.join(map(repr, unknown))} in the full form; "
            f"allowed: {', '.join(sorted(_FULL_FORM_KEYS))} (vector names go inside 'components')"
        )
    items = obj.get("components")
    if not isinstance(items, list | tuple):
        raise TunevecError(f"steering 'components' must be a list of components, got {items!r}")
    method = obj.get("method", "linear")
    if not isinstance(method, str):
        raise TunevecError(f"steering 'method' must be a string, got {method!r}")
    components = []
    for i, item in enumerate(items):
        where = f"components[{i}]"
        if not isinstance(item, Mapping):
            raise TunevecError(f"steering {where} must be a mapping with 'vector', got {item!r}")
        extra = sorted(set(item) - set(_COMPONENT_KEYS), key=str)
        if extra:
            raise TunevecError(
                f"unknown key(s) {', '.join(map(repr, extra))} in steering {where}; allowed: {', '.join(_COMPONENT_KEYS)}"
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
    return Spec(tuple(components), method=method, density=obj.get("density"), seed=obj.get("seed"))


def _from_plain_json(obj: Mapping[str, Any]) -> Spec:
    components = []
    for key, value in obj.items():
        if not isinstance(key, str):
            raise TunevecError(f"steering keys must be vector names, got {key!r}")
        selector = _Parser(key, what="steering key").selector_only()
        if not _is_number(value):
            raise TunevecError(f"steering coefficient for {key!r} must be a number, got {value!r}")
        try:
            components.append(Component(selector.vector, value, selector.scope, selector.layers))
        except TunevecError as e:
            raise TunevecError(f"steering key {key!r}: {e}") from None
    return Spec(tuple(components))


# --- text ------------------------------------------------------------------------------------------------------


class _Parser:
    """Recursive descent over the grammar in docs/spec-grammar.md; whitespace between tokens is ignored."""

    def __init__(self, text: str, what: str = "steering spec"):
        self.text = text
        self.what = what
        self.pos = 0

    def fail(self, message: str, pos: int | None = None) -> NoReturn:
        column = (self.pos if pos is None else pos) + 1
        raise TunevecError(f"invalid {self.what} {self.text!r} at column {column}: {message}")

    def peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def found(self) -> str:
        if not self.peek():
            return "end of text"
        return repr(_TOKEN.match(self.text, self.pos).group())

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
                self.fail(f"unknown method {word!r}; use one of {', '.join(METHODS)}", start)
            if self.take("("):
                params = self.params(method)
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
        for i, (a, _) in enumerate(parsed):
            for b, b_pos in parsed[i + 1 :]:
                problem = _conflict(a, b)
                if problem:
                    self.fail(problem, b_pos)
        try:
            return Spec(tuple(c for c, _ in parsed), method=method, **params)
        except TunevecError as e:
            self.fail(str(e), start)

    # params = "(" [ param { ( ";" | "," ) param } ] ")" ;  param = name "=" value
    def params(self, method: str) -> dict[str, float | int]:
        declared = METHODS[method]
        params: dict[str, float | int] = {}
        if self.take(")"):
            return params
        while True:
            self.peek()
            key_pos = self.pos
            key = self.match(_WORD)
            if key is None:
                self.fail(f"expected a parameter name, got {self.found()}")
            if key not in declared:
                takes = ", ".join(declared) if declared else "no parameters"
                self.fail(f"unknown parameter {key!r} for method {method!r} (it takes {takes})", key_pos)
            if key in params:
                self.fail(f"parameter {key!r} given twice", key_pos)
            self.expect("=", f"after parameter {key!r}")
            self.peek()
            value_pos = self.pos
            params[key] = self.integer(key) if isinstance(declared[key], int) else self.number(key)
            problem = _param_problem(key, params[key])
            if problem:
                self.fail(problem, value_pos)
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
                f"unexpected {self.found()} in component {vector!r}; write vector@scope[start:stop]:alpha"
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
                self.fail(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}", scope_pos)
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
        digits = self.match(_INTEGER)
        return None if digits is None else int(digits)

    def number(self, what: str) -> float:
        self.peek()
        pos = self.pos
        text = self.match(_NUMBER)
        if text is None:
            word = _NOT_FINITE.match(self.text, pos)
            if word:
                self.fail(f"{what} must be a finite number, got {word.group()!r}", pos)
            self.fail(f"expected a number for the {what}, got {self.found()}")
        value = float(text)
        if not math.isfinite(value):
            self.fail(f"{what} must be a finite number, got {text!r} (too large)", pos)
        return value

    def integer(self, what: str) -> int:
        self.peek()
        pos = self.pos
        text = self.match(_INTEGER)
        if text is None or self.peek() in (".", "e", "E"):
            self.pos = pos  # quote the whole offending token, not what follows its digits
            self.fail(f"{what} must be a non-negative integer, got {self.found()}")
        return int(text)

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
