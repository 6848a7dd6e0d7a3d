"""Property-based tests of the spec grammar (issue 12, "a property-based test of the spec grammar").

- any valid spec survives parse -> canonical -> parse, and the JSON round trip, unchanged;
- every other spelling of it (order, whitespace, number forms, defaults written out) parses to the same spec;
- arbitrary unicode, lengths, numbers and JSON values never raise anything but TunevecError, with a short message;
- the conflict check (same vector on overlapping scopes) agrees with its pairwise definition.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunevec.core.errors import TunevecError
from tunevec.steering.merge import METHODS
from tunevec.steering.spec import (
    _LAYERLESS_SCOPES,
    MAX_SPEC_CHARS,
    SCOPES,
    Component,
    Spec,
    _first_conflict,
    format_number,
)

# Modest and deterministic: the suite runs on shared CPUs, and a failure must reproduce.
FAST = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
MESSAGE_LIMIT = 600

_FIRST = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
names = st.builds(
    str.__add__, st.sampled_from(_FIRST), st.text(alphabet=_FIRST + "0123456789.-", max_size=10)
)
alphas = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**6), 10**6)
layer_ranges = st.tuples(st.integers(0, 40), st.none() | st.integers(0, 60)).filter(
    lambda r: r[1] is None or r[1] > r[0]
)


@st.composite
def components(draw, vectors=names) -> Component:
    scope = draw(st.sampled_from(list(SCOPES)))
    layers = None if scope in _LAYERLESS_SCOPES else draw(st.none() | layer_ranges)
    return Component(draw(vectors), draw(alphas), scope, layers)


PARAM_VALUES = {
    "density": st.floats(min_value=0.0, max_value=1.0, exclude_min=True) | st.just(1),
    "seed": st.integers(0, 2**63 - 1),
}


@st.composite
def specs(draw) -> Spec:
    kept: list[Component] = []
    for c in draw(st.lists(components(st.sampled_from(["medical", "math", "m.v-2"]) | names), max_size=6)):
        if _first_conflict([*kept, c]) is None:
            kept.append(c)
    if not kept:
        kept = [draw(components())]
    method = draw(st.sampled_from(list(METHODS)))
    params = {p.name: draw(PARAM_VALUES[p.name]) for p in METHODS[method].params if draw(st.booleans())}
    return Spec(tuple(kept), method, params)


def _raises_only_tunevec_error(fn, value) -> Spec | None:
    try:
        return fn(value)
    except TunevecError as e:
        assert len(str(e)) <= MESSAGE_LIMIT, str(e)[:200]
        return None


# --- round trips ---------------------------------------------------------------------------------------------------


@FAST
@given(specs())
def test_parse_of_canonical_text_gives_back_the_same_spec(spec):
    text = spec.canonical()
    again = Spec.parse(text)
    assert again == spec
    assert again.canonical() == text
    assert again.digest() == spec.digest() and again.int_id() == spec.int_id()


@FAST
@given(specs())
def test_json_round_trip_gives_back_the_same_spec(spec):
    obj = json.loads(json.dumps(spec.to_json()))
    assert Spec.from_json(obj) == spec
    assert Spec.from_json(spec.canonical()) == spec
    if spec.method == "linear" and not any(c.alpha != c.alpha for c in spec.components):
        plain = {c.selector: c.alpha for c in spec.components}
        assert Spec.from_json(plain) == spec


def _number_spellings(x: float) -> st.SearchStrategy[str]:
    spellings = {format_number(x), repr(x), f"{x:.17e}"}
    if x == int(x) and abs(x) < 1e15:
        spellings |= {str(int(x)), f"{int(x)}.0", f"{int(x)}."}
    return st.sampled_from(sorted(s for s in spellings if float(s) == x))


@st.composite
def other_spellings(draw, spec: Spec) -> str:
    """The same spec written another way: component order, selector/coefficient order, whitespace, number
    forms, ':1' and '@all' written out, parameters in another order with ',' or ';', defaults spelled out."""
    space = st.sampled_from(["", " ", "  ", "\t", "\n "])
    parts = []
    for c in draw(st.permutations(spec.components)):
        selector = c.vector
        if c.scope != "all" or draw(st.booleans()):
            selector += f"{draw(space)}@{draw(space)}{c.scope}"
        if c.layers is not None:
            start, stop = c.layers
            if stop == start + 1 and draw(st.booleans()):
                selector += f"[{draw(space)}{start}{draw(space)}]"
            else:
                first = "" if start == 0 and draw(st.booleans()) else str(start)
                selector += f"[{first}{draw(space)}:{draw(space)}{'' if stop is None else stop}]"
        alpha = draw(_number_spellings(c.alpha)) if c.alpha != 1.0 or draw(st.booleans()) else None
        if alpha is None:
            parts.append(selector)
        elif draw(st.booleans()):
            parts.append(f"{selector}{draw(space)}:{draw(space)}{alpha}")
        else:
            body = selector[len(c.vector) :]
            parts.append(f"{c.vector}{draw(space)}:{draw(space)}{alpha}{draw(space)}{body}")
    text = f"{draw(space)}+{draw(space)}".join(parts)
    if spec.method != "linear" or draw(st.booleans()):
        params = [f"{k}{draw(space)}={draw(space)}{draw(_param_spelling(v))}" for k, v in spec.params]
        params = draw(st.permutations(params))
        sep = draw(st.sampled_from([";", ",", " ; "]))
        text = f"{spec.method}{draw(space)}({sep.join(params)}){draw(space)}/{draw(space)}{text}"
    return f"{draw(space)}{text}{draw(space)}"


def _param_spelling(value: int | float) -> st.SearchStrategy[str]:
    if isinstance(value, int):
        return st.sampled_from([str(value), "000" + str(value)])
    return _number_spellings(value)


@FAST
@given(st.data())
def test_every_other_spelling_parses_to_the_same_spec(data):
    spec = data.draw(specs())
    text = data.draw(other_spellings(spec))
    assert Spec.parse(text) == spec, text


# --- hostile input -------------------------------------------------------------------------------------------------

GRAMMAR = "abcmdelitrsunv_.-0123456789:+@[]()=;,/ eE\t"


@FAST
@given(st.text(max_size=300) | st.text(alphabet=GRAMMAR, max_size=300))
def test_arbitrary_text_raises_only_tunevec_error_and_what_parses_round_trips(text):
    spec = _raises_only_tunevec_error(Spec.parse, text)
    if spec is not None:
        assert Spec.parse(spec.canonical()) == spec


@FAST
@given(
    st.integers(MAX_SPEC_CHARS - 5, 3 * MAX_SPEC_CHARS),
    st.sampled_from(["medical", " ", "+", "[", "9", "é", "medical:0.5+"]),
)
def test_any_length_is_refused_cleanly_or_parsed(length, unit):
    text = (unit * (length // len(unit) + 1))[:length]
    spec = _raises_only_tunevec_error(Spec.parse, text)
    assert spec is None or len(text) <= MAX_SPEC_CHARS


digits = st.text(alphabet="0123456789", min_size=1, max_size=6000)


@FAST
@given(
    st.sampled_from(
        [
            "medical:{}",
            "medical:-{}",
            "medical:{}.{}",
            "medical:{}e{}",
            "medical:.{}e-{}",
            "medical[{}:{}]",
            "medical[{}]",
            "ties(density={}.{})/medical",
            "dare(seed={})/medical",
            "dare(density=0.{};seed={})/medical",
        ]
    ),
    digits,
    digits,
)
def test_numbers_of_any_length_raise_only_tunevec_error(template, a, b):
    _raises_only_tunevec_error(Spec.parse, template.format(a, b))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**5000), max_value=10**5000)
    | st.floats()
    | st.text(max_size=40)
    | st.sampled_from(["medical", "mlp", "ties", "dare", "components", "vector"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
json_keys = st.sampled_from(["medical", "math@mlp", "medical[0:4]", "method", "density", "seed"]) | st.text(
    max_size=20
)


@FAST
@given(json_values)
def test_arbitrary_json_raises_only_tunevec_error(obj):
    _raises_only_tunevec_error(Spec.from_json, obj)


@FAST
@given(st.dictionaries(json_keys, json_values | alphas, max_size=6))
def test_arbitrary_plain_mappings_raise_only_tunevec_error(obj):
    spec = _raises_only_tunevec_error(Spec.from_json, obj)
    if spec is not None:
        assert Spec.from_json(spec.to_json()) == spec


component_objects = st.dictionaries(
    st.sampled_from(["vector", "alpha", "scope", "layers", "weight"]),
    json_values
    | names
    | alphas
    | st.sampled_from(list(SCOPES))
    | st.lists(st.none() | st.integers(), max_size=3),
    max_size=5,
)


@FAST
@given(
    st.fixed_dictionaries(
        {"components": st.lists(component_objects, max_size=4) | json_values},
        optional={
            "method": st.sampled_from(list(METHODS)) | json_values,
            "density": json_values | st.floats(0, 1),
            "seed": json_values | st.integers(0, 2**64),
        },
    )
)
def test_arbitrary_full_forms_raise_only_tunevec_error(obj):
    spec = _raises_only_tunevec_error(Spec.from_json, obj)
    if spec is not None:
        assert Spec.parse(spec.canonical()) == spec


# --- the conflict check --------------------------------------------------------------------------------------------


def _pairwise_overlap(a: Component, b: Component) -> bool:
    """The documented rule, pair by pair: same vector, scopes sharing a role, layer coverage intersecting."""
    if a.vector != b.vector:
        return False
    roles_a, roles_b = SCOPES[a.scope], SCOPES[b.scope]
    if roles_a is not None and roles_b is not None and not roles_a & roles_b:
        return False
    if a.layers is None and b.layers is None:
        return True
    if a.layers is None or b.layers is None:
        return (a if a.layers is None else b).scope not in _LAYERLESS_SCOPES
    (sa, ea), (sb, eb) = a.layers, b.layers
    return max(sa, sb) < min(math.inf if ea is None else ea, math.inf if eb is None else eb)


@FAST
@given(st.lists(components(st.sampled_from(["m", "n"])), min_size=1, max_size=8))
def test_conflict_check_agrees_with_the_pairwise_rule(comps):
    pairwise = any(_pairwise_overlap(a, b) for i, a in enumerate(comps) for b in comps[i + 1 :])
    assert (_first_conflict(comps) is not None) == pairwise
