"""The variant spec: text and JSON spellings, canonical form, identity, validation and scopes."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from tunevec.core.errors import TunevecError
from tunevec.steering.spec import Component, Spec, format_number

# (input text, canonical text)
VALID = [
    ("medical", "medical"),
    ("medical:1", "medical"),
    ("medical:0.8+math:0.4", "math:0.4+medical:0.8"),
    ("medical:-1", "medical:-1"),
    ("medical:0", "medical:0"),
    ("medical@mlp", "medical@mlp"),
    ("medical@attention:0.5", "medical@attention:0.5"),
    ("medical@mlp[0:12]:0.5", "medical@mlp[0:12]:0.5"),
    ("medical:0.5@mlp[0:12]", "medical@mlp[0:12]:0.5"),
    ("medical[4:]", "medical[4:]"),
    ("medical[:4]", "medical[0:4]"),
    ("medical[3]", "medical[3:4]"),
    ("medical@norm[2:]:-0.25", "medical@norm[2:]:-0.25"),
    ("medical@embeddings:2", "medical@embeddings:2"),
    ("medical@mlp+medical@attention:0.5", "medical@attention:0.5+medical@mlp"),
    ("medical[0:4]+medical@mlp[4:]", "medical[0:4]+medical@mlp[4:]"),
    ("medical:1e-5", "medical:1e-05"),
    ("medical:.5", "medical:0.5"),
    ("ties(density=0.5)/medical+math", "ties(density=0.5)/math+medical"),
    ("ties/medical", "ties(density=0.5)/medical"),
    ("dare(density=0.3,seed=7)/medical:1+math:0.5", "dare(density=0.3;seed=7)/math:0.5+medical"),
    ("dare(seed=7;density=0.3)/medical+math:0.5", "dare(density=0.3;seed=7)/math:0.5+medical"),
    ("dare/medical", "dare(density=0.5;seed=0)/medical"),
    ("linear/medical:2", "medical:2"),
    ("my_vec.v2-final:0.1", "my_vec.v2-final:0.1"),
]


@pytest.mark.parametrize(("text", "canonical"), VALID)
def test_every_valid_form_round_trips_through_canonical_text(text, canonical):
    spec = Spec.parse(text)
    assert spec.canonical() == canonical
    again = Spec.parse(spec.canonical())
    assert again == spec
    assert again.canonical() == canonical


EQUIVALENT = [
    ["medical:0.8+math:0.4", "math:0.4+medical:0.8", " math : 0.4 + medical : 0.80 ", "math:4e-1+medical:.8"],
    ["medical", "medical:1", "medical:1.0", "medical@all", "medical@all:1e0"],
    ["medical:0", "medical:-0", "medical:0.0"],
    ["medical@mlp[0:12]:0.5", "medical:0.5@mlp[0:12]", "medical@mlp[:12]:0.5"],
    ["ties/medical", "ties()/medical", "ties(density=0.5)/medical", "ties(density=.5)/medical"],
    ["dare(density=0.3)/medical", "dare(density=0.3;seed=0)/medical", "dare(seed=0,density=0.3)/medical"],
    ["linear/medical", "linear()/medical", "medical"],
]


@pytest.mark.parametrize("texts", EQUIVALENT)
def test_equivalent_inputs_share_canonical_text_and_digest(texts):
    specs = [Spec.parse(t) for t in texts]
    assert len({s.canonical() for s in specs}) == 1
    assert len({s.digest() for s in specs}) == 1
    assert all(s == specs[0] for s in specs)


DIFFERENT = [
    "medical",
    "medical:0.5",
    "medical:-0.5",
    "math",
    "medical+math",
    "medical@mlp",
    "medical@mlp[0:12]",
    "medical@mlp[0:11]",
    "medical@mlp[0:]",
    "medical[0:12]",
    "ties/medical",
    "ties(density=0.3)/medical",
    "dare/medical",
    "dare(seed=1)/medical",
]


def test_different_specs_have_different_canonical_text_digests_and_ids():
    specs = [Spec.parse(t) for t in DIFFERENT]
    assert len({s.canonical() for s in specs}) == len(DIFFERENT)
    assert len({s.digest() for s in specs}) == len(DIFFERENT)
    assert len({s.int_id() for s in specs}) == len(DIFFERENT)


def test_digest_is_sha256_of_canonical_text_and_int_id_is_a_stable_positive_31_bit_int():
    spec = Spec.parse("medical:0.8+math:0.4")
    assert spec.digest() == hashlib.sha256(b"math:0.4+medical:0.8").hexdigest()
    assert 1 <= spec.int_id() < 2**31
    # Pinned: the id must not change between releases or processes, or vLLM would mix up cached adapters.
    assert Spec.parse("medical").int_id() == 598373681


def test_format_number_is_shortest_round_trip_without_plus_signs():
    assert [format_number(x) for x in (1.0, -1.0, 0.8, -0.0 + 0.0, 1e-5, 1e20, 0.1 + 0.2)] == [
        "1",
        "-1",
        "0.8",
        "0",
        "1e-05",
        "1e20",
        "0.30000000000000004",
    ]
    for x in (0.1, 1 / 3, 2.5e-7, 123456789.123):
        assert float(format_number(x)) == x


# (text, words the message must contain)
INVALID = [
    ("", ["empty spec"]),
    ("   ", ["empty spec"]),
    ("medical:nan", ["finite", "'nan'", "column 9"]),
    ("medical:inf", ["finite", "'inf'"]),
    ("medical:-Infinity", ["finite"]),
    ("medical:1e400", ["finite", "1e400"]),
    ("medical:", ["expected a number", "end of text"]),
    ("medical:abc", ["expected a number", "'abc'"]),
    ("medical+medical:0.5", ["duplicate component", "'medical'", "column 9"]),
    ("medical@mlp:1+medical@mlp:2", ["duplicate component", "'medical@mlp'"]),
    ("medical+medical@mlp", ["twice to the same tensors", "disjoint"]),
    ("medical@mlp[0:8]+medical@mlp[4:12]", ["twice to the same tensors"]),
    ("medical@mlpp", ["unknown scope 'mlpp'", "column 9", "attention"]),
    ("medical@", ["expected a scope"]),
    ("medical[4:2]", ["'medical'", "empty", "half-open", "column 8"]),
    ("medical[3:3]", ["empty"]),
    ("medical[-1:3]", ["negative indexing", "column 9"]),
    ("medical[a:3]", ["expected a layer index", "'a'"]),
    ("medical[0:3", ["expected ']'"]),
    ("medical@embeddings[0:2]", ["'embeddings' has no layers"]),
    ("foo(density=0.5)/medical", ["unknown method 'foo'", "linear, ties, dare"]),
    ("foo/medical", ["unknown method 'foo'"]),
    ("ties(seed=1)/medical", ["unknown parameter 'seed'", "'ties'"]),
    ("linear(density=0.5)/medical", ["unknown parameter 'density'", "no parameters"]),
    ("ties(density=0)/medical", ["density", "(0, 1]", "column 14"]),
    ("ties(density=1.5)/medical", ["density", "(0, 1]"]),
    ("ties(density=-0.5)/medical", ["density", "(0, 1]"]),
    ("ties(density=nan)/medical", ["density", "finite"]),
    ("dare(seed=1.5)/medical", ["seed", "integer", "'1.5'"]),
    ("dare(seed=-1)/medical", ["seed", "integer"]),
    ("ties(density=0.5,density=0.4)/medical", ["'density' given twice"]),
    ("ties(density=0.5 seed=1)/medical", ["expected ';' or ')'"]),
    ("ties(density=0.5)medical", ["expected '/'"]),
    ("medical:0.8 math:0.4", ["expected '+'", "%2B"]),
    ("medical:0.5:0.3", ["unexpected ':'"]),
    ("medical@mlp:0.5@attention", ["unexpected '@'"]),
    ("medical+", ["expected a vector name", "end of text"]),
    ("+medical", ["expected a vector name", "'+'"]),
    ("2medical", ["expected a vector name"]),
    ("médical", ["unexpected"]),
    ("+".join(f"v{i}" for i in range(300)), ["too many components"]),
]


@pytest.mark.parametrize(("text", "words"), INVALID)
def test_every_invalid_text_form_raises_an_error_naming_the_problem(text, words):
    with pytest.raises(TunevecError) as info:
        Spec.parse(text)
    message = str(info.value)
    assert message.startswith("invalid steering spec")
    for word in words:
        assert word in message


def test_parse_rejects_non_strings():
    with pytest.raises(TunevecError, match="must be a string"):
        Spec.parse(1.5)  # type: ignore[arg-type]


def test_same_vector_with_disjoint_scopes_is_allowed():
    spec = Spec.parse("medical@mlp:0.5+medical@attention:-0.5+medical@embeddings:0.1+medical@norm[0:4]")
    assert spec.vectors == ("medical",)
    assert len(spec.components) == 4
    Spec.parse("medical@mlp[0:4]+medical@mlp[4:8]+medical@embeddings+medical[8:]")


# --- validate ------------------------------------------------------------------------------------------------


def test_validate_passes_a_good_spec_and_returns_it():
    spec = Spec.parse("medical@mlp[0:30]:0.8+math:-4")
    assert spec.validate({"medical", "math", "code"}, num_layers=30) is spec


def test_validate_names_an_unknown_vector_and_lists_the_known_ones():
    with pytest.raises(TunevecError, match=r"unknown vector 'medicl'.*known vectors: code, math"):
        Spec.parse("medicl:0.5").validate(["math", "code"])
    with pytest.raises(TunevecError, match="no vectors|extract"):
        Spec.parse("medical").validate([])


def test_validate_bounds_the_coefficient_magnitude():
    with pytest.raises(
        TunevecError, match=r"coefficient -4.5 of component 'medical:-4.5' is outside \[-4, 4\]"
    ):
        Spec.parse("medical:-4.5").validate(["medical"])
    Spec.parse("medical:9").validate(["medical"], max_abs_alpha=10)


def test_validate_limits_the_number_of_components():
    names = [f"v{i}" for i in range(9)]
    with pytest.raises(TunevecError, match="9 components, at most 8"):
        Spec.parse("+".join(names)).validate(names)
    Spec.parse("+".join(names)).validate(names, max_components=9)


@pytest.mark.parametrize("text", ["medical[0:31]", "medical[30:]", "medical@mlp[40:50]"])
def test_validate_rejects_layer_ranges_beyond_the_model(text):
    with pytest.raises(TunevecError, match="beyond the model's 30 layers"):
        Spec.parse(text).validate(["medical"], num_layers=30)


# --- JSON ----------------------------------------------------------------------------------------------------


def test_plain_json_mapping_agrees_with_text():
    assert Spec.from_json({"medical": 0.8, "math": 0.4}) == Spec.parse("medical:0.8+math:0.4")
    assert Spec.from_json({"medical@mlp[0:12]": -1, "math": 1}) == Spec.parse("math+medical@mlp[0:12]:-1")


def test_full_json_form_agrees_with_text():
    obj = {
        "method": "ties",
        "density": 0.5,
        "components": [
            {"vector": "medical", "alpha": 0.8, "scope": "mlp", "layers": [0, 12]},
            {"vector": "math", "alpha": 0.4},
        ],
    }
    assert Spec.from_json(obj) == Spec.parse("ties(density=0.5)/medical@mlp[0:12]:0.8+math:0.4")
    dare = {"method": "dare", "seed": 7, "components": [{"vector": "medical", "layers": [4, None]}]}
    assert Spec.from_json(dare).canonical() == "dare(density=0.5;seed=7)/medical[4:]"


def test_json_accepts_the_text_form_as_a_string():
    assert Spec.from_json("medical:0.8") == Spec.parse("medical:0.8")


@pytest.mark.parametrize(("text", "_"), VALID)
def test_every_valid_form_round_trips_through_json(text, _):
    spec = Spec.parse(text)
    obj = json.loads(json.dumps(spec.to_json()))
    assert Spec.from_json(obj) == spec
    assert Spec.from_json(obj).to_json() == obj


def test_to_json_is_the_full_form_with_every_parameter():
    assert Spec.parse("dare/medical@mlp[0:4]:0.5").to_json() == {
        "method": "dare",
        "density": 0.5,
        "seed": 0,
        "components": [{"vector": "medical", "alpha": 0.5, "scope": "mlp", "layers": [0, 4]}],
    }


INVALID_JSON = [
    ({}, ["empty spec"]),
    ({"components": []}, ["empty spec"]),
    ([("medical", 1)], ["must be a string, a mapping"]),
    ({"medical": "0.5"}, ["coefficient for 'medical' must be a number"]),
    ({"medical": True}, ["must be a number"]),
    ({"medical": math.nan}, ["finite"]),
    ({"medical": math.inf}, ["finite"]),
    ({"medical:0.5": 1}, ["coefficient in the value"]),
    ({"medical@mlpp": 1}, ["unknown scope 'mlpp'"]),
    ({"medical": 1, "medical@mlp": 1}, ["twice to the same tensors"]),
    ({"components": [{"vector": "medical"}], "medical": 1}, ["unknown steering key(s) 'medical'"]),
    ({"method": "ties"}, ["'components' must be a list"]),
    ({"method": "slerp", "components": [{"vector": "m"}]}, ["unknown method 'slerp'"]),
    ({"method": "ties", "seed": 1, "components": [{"vector": "m"}]}, ["takes no parameter 'seed'"]),
    ({"method": "ties", "density": 0, "components": [{"vector": "m"}]}, ["density", "(0, 1]"]),
    ({"method": "dare", "seed": 1.0, "components": [{"vector": "m"}]}, ["seed must be an integer"]),
    ({"components": [{"alpha": 1}]}, ["components[0]", "no 'vector'"]),
    ({"components": [{"vector": "m", "weight": 1}]}, ["components[0]", "unknown key(s) 'weight'"]),
    ({"components": [{"vector": "m", "alpha": None}]}, ["components[0]", "must be a number"]),
    ({"components": [{"vector": "m", "scope": "mlps"}]}, ["components[0]", "unknown scope 'mlps'"]),
    ({"components": [{"vector": "m", "layers": [4, 2]}]}, ["components[0]", "empty"]),
    ({"components": [{"vector": "m", "layers": [-1, 2]}]}, ["negative"]),
    ({"components": [{"vector": "m", "layers": [0]}]}, ["[start, stop]"]),
    ({"components": [{"vector": "m", "layers": [0.5, 2]}]}, ["integers"]),
    ({"components": [{"vector": "bad name"}]}, ["invalid vector name 'bad name'"]),
    ({"components": ["medical"]}, ["components[0] must be a mapping"]),
]


@pytest.mark.parametrize(("obj", "words"), INVALID_JSON)
def test_every_invalid_json_form_raises_an_error_naming_the_problem(obj, words):
    with pytest.raises(TunevecError) as info:
        Spec.from_json(obj)
    for word in words:
        assert word in str(info.value)


# --- scopes --------------------------------------------------------------------------------------------------

TENSORS = {
    "embed": "model.embed_tokens.weight",
    "head": "lm_head.weight",
    "final_norm": "model.norm.weight",
    "q0": "model.layers.0.self_attn.q_proj.weight",
    "o5": "model.layers.5.self_attn.o_proj.weight",
    "up0": "model.layers.0.mlp.up_proj.weight",
    "down11": "model.layers.11.mlp.down_proj.weight",
    "down12": "model.layers.12.mlp.down_proj.weight",
    "ln3": "model.layers.3.input_layernorm.weight",
    "rotary": "model.layers.2.self_attn.rotary_emb.inv_freq",
}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("v", set(TENSORS)),
        ("v@mlp", {"up0", "down11", "down12"}),
        ("v@attention", {"q0", "o5"}),
        ("v@embeddings", {"embed", "head"}),
        ("v@norm", {"final_norm", "ln3"}),
        ("v@mlp[0:12]", {"up0", "down11"}),
        ("v@mlp[12:]", {"down12"}),
        ("v@norm[0:4]", {"ln3"}),
        ("v[0:6]", {"q0", "o5", "up0", "ln3", "rotary"}),
        ("v[5]", {"o5"}),
    ],
)
def test_scope_restricts_application_by_role_and_layer_range(selector, expected):
    (component,) = Spec.parse(selector).components
    assert {key for key, name in TENSORS.items() if component.applies_to(name)} == expected


def test_vectors_lists_each_needed_vector_once_sorted():
    assert Spec.parse("medical@mlp+math+medical@attention:2").vectors == ("math", "medical")


def test_components_are_frozen_and_direct_construction_normalises():
    c = Component("medical", -0.0, "mlp", [0, 4])  # type: ignore[arg-type]
    assert c.alpha == 0.0 and math.copysign(1, c.alpha) == 1 and c.layers == (0, 4)
    with pytest.raises(AttributeError):
        c.alpha = 2.0  # type: ignore[misc]
    spec = Spec([Component("b"), Component("a", 2)], method="dare")  # type: ignore[arg-type]
    assert spec.canonical() == "dare(density=0.5;seed=0)/a:2+b"
    assert hash(spec) == hash(Spec.parse(spec.canonical()))


# --- hostile input (issue 12 findings 1 and 2) ---------------------------------------------------------------------
# Every malformed request raises TunevecError (a 400), never OverflowError, ValueError from int()'s digit limit,
# RecursionError or TypeError (a 500); the work is bounded before it starts; messages quote a short excerpt only.

from tunevec.steering import spec as spec_module  # noqa: E402
from tunevec.steering.spec import MAX_PARSED_COMPONENTS, MAX_SPEC_CHARS  # noqa: E402

MESSAGE_LIMIT = 600  # characters: a message says what and where, it never carries the input


def _nested(depth: int, leaf: object = 1, kind=list) -> object:
    node = leaf
    for _ in range(depth):
        node = [node] if kind is list else {"components": node}
    return node


def _error(fn, *args) -> str:
    with pytest.raises(TunevecError) as info:
        fn(*args)
    message = str(info.value)
    assert len(message) <= MESSAGE_LIMIT, f"{len(message)}-character message: {message[:200]}..."
    return message


HOSTILE_TEXT = [
    ("400-digit alpha", "medical:" + "9" * 400, ["finite", "too large"]),
    ("400-digit alpha, exponent", "medical:1" + "0" * 400 + "e5", ["finite"]),
    ("5000-digit layer", "medical[" + "7" * 5000 + ":]", ["layer index", "too large", "column 9"]),
    ("5000-digit stop", "medical[0:" + "7" * 5000 + "]", ["layer index", "too large"]),
    ("5000-digit seed", "dare(seed=" + "7" * 5000 + ")/medical", ["seed", "too large"]),
    ("20-digit seed", "dare(seed=99999999999999999999)/medical", ["seed", "too large"]),
    ("seed 2^63", f"dare(seed={2**63})/medical", ["seed must be an integer in [0, 2^63)"]),
    ("long vector name", "v" * (MAX_SPEC_CHARS - 2) + "@x", ["unknown scope 'x'", "…"]),
    ("long token", "medical:" + "x" * 10_000, ["expected a number", "characters)"]),
    ("non-ASCII digits", "medical[٣]", ["expected a layer index"]),
    ("NUL", "medical\x00", ["unexpected"]),
]


@pytest.mark.parametrize(("text", "words"), [c[1:] for c in HOSTILE_TEXT], ids=[c[0] for c in HOSTILE_TEXT])
def test_hostile_text_raises_a_short_tunevec_error(text, words):
    message = _error(Spec.parse, text)
    assert message.startswith("invalid steering spec")
    for word in words:
        assert word in message


def test_text_longer_than_the_limit_is_refused_before_parsing(monkeypatch):
    monkeypatch.setattr(spec_module, "_Parser", lambda *a, **k: pytest.fail("parsed an over-long spec"))
    message = _error(Spec.parse, "medical+" * 400_000 + "math")
    assert f"at most {MAX_SPEC_CHARS}" in message
    assert "medical+medical" not in message


def test_error_messages_quote_an_excerpt_around_the_column():
    text = "a+" * 200 + "b@mlpp"
    message = _error(Spec.parse, text)
    excerpt = message.split(" at column ")[0].removeprefix("invalid steering spec ")
    assert len(excerpt) <= 80 + 4  # 80 characters, the ellipses and the quotes
    assert "b@mlpp" in excerpt and excerpt.startswith("'…")
    assert f"at column {len(text) - 3}" in message


def test_whitespace_up_to_the_limit_is_skipped():
    pad = " \t\n" * (MAX_SPEC_CHARS // 16)  # four pads of 3/16 of the limit each
    assert Spec.parse(pad + "medical" + pad + ":" + pad + "0.5" + pad) == Spec.parse("medical:0.5")


def _count_components(monkeypatch) -> dict[str, int]:
    built = {"n": 0}
    real = Component.__post_init__

    def counting(self):
        built["n"] += 1
        real(self)

    monkeypatch.setattr(Component, "__post_init__", counting)
    return built


def test_a_plain_mapping_with_too_many_keys_builds_no_component(monkeypatch):
    built = _count_components(monkeypatch)
    message = _error(Spec.from_json, {f"v{i}": 1.0 for i in range(200_000)})
    assert built["n"] == 0
    assert f"200000 keys; at most {MAX_PARSED_COMPONENTS}" in message


def test_a_full_form_with_too_many_components_builds_none(monkeypatch):
    built = _count_components(monkeypatch)
    message = _error(Spec.from_json, {"components": [{"vector": f"v{i}"} for i in range(100_000)]})
    assert built["n"] == 0
    assert f"100000 items; at most {MAX_PARSED_COMPONENTS}" in message


def test_plain_keys_adding_up_past_the_text_limit_are_refused(monkeypatch):
    built = _count_components(monkeypatch)
    keys = {"v" * 1000 + str(i): 1 for i in range(MAX_PARSED_COMPONENTS)}
    assert "characters; at most" in _error(Spec.from_json, keys)
    assert built["n"] == 0


HOSTILE_JSON = [
    ("400-digit int alpha", {"medical": 10**400}, ["finite", "about 401 digits"]),
    ("400-digit int alpha, full", {"components": [{"vector": "m", "alpha": -(10**400)}]}, ["finite"]),
    ("inf alpha", {"medical": 1e308 * 10}, ["finite"]),
    ("5000-digit layer", {"components": [{"vector": "m", "layers": [10**5000, None]}]}, ["too large"]),
    ("negative 5000-digit", {"components": [{"vector": "m", "layers": [-(10**5000), 3]}]}, ["negative"]),
    ("5000-digit seed", {"method": "dare", "seed": 10**5000, "components": [{"vector": "m"}]}, ["seed"]),
    (
        "5000-digit density",
        {"method": "ties", "density": 10**5000, "components": [{"vector": "m"}]},
        ["(0, 1]"],
    ),
    ("nan density", {"method": "ties", "density": math.nan, "components": [{"vector": "m"}]}, ["density"]),
    ("bool alpha", {"components": [{"vector": "m", "alpha": True}]}, ["must be a number"]),
    ("bool layer", {"components": [{"vector": "m", "layers": [True, 2]}]}, ["integers"]),
    ("bool density", {"method": "ties", "density": True, "components": [{"vector": "m"}]}, ["density"]),
    ("bool seed", {"method": "dare", "seed": False, "components": [{"vector": "m"}]}, ["seed"]),
    ("bool method", {"method": True, "components": [{"vector": "m"}]}, ["'method' must be a string"]),
    ("bool scope", {"components": [{"vector": "m", "scope": True}]}, ["unknown scope True"]),
    ("bool vector", {"components": [{"vector": False}]}, ["invalid vector name False"]),
    ("list method", {"method": ["ties"], "components": [{"vector": "m"}]}, ["a list of 1 items"]),
    ("int key", {1: 0.5}, ["keys must be strings", "1"]),
    ("tuple key", {("a",): 0.5}, ["keys must be strings", "a list of 1 items"]),
    ("None key", {None: 0.5, "medical": 1}, ["keys must be strings"]),
    ("int key in component", {"components": [{"vector": "m", 5: 1}]}, ["unknown key(s) 5"]),
    ("nested components", {"components": _nested(50_000)}, ["components[0] must be a mapping"]),
    ("nested value", {"medical": _nested(50_000)}, ["must be a number", "a list of 1 items"]),
    ("nested layers", {"components": [{"vector": "m", "layers": _nested(50_000)}]}, ["[start, stop]"]),
    ("nested vector", {"components": [{"vector": _nested(50_000, kind=dict)}]}, ["a mapping of 1 keys"]),
    ("nested mapping", _nested(50_000, kind=dict), ["'components' must be a list", "a mapping of 1 keys"]),
    ("nested method", {"method": _nested(50_000), "components": []}, ["'method' must be a string"]),
    (
        "huge vector name",
        {"components": [{"vector": "v" * 10**6}]},
        ["invalid vector name", "1000000 characters"],
    ),
    ("huge key", {"v" * 10**6: 1}, ["characters; at most"]),
    ("bytes", b"medical", ["got bytes"]),
    ("set", {"medical"}, ["got set"]),
]


@pytest.mark.parametrize(("obj", "words"), [c[1:] for c in HOSTILE_JSON], ids=[c[0] for c in HOSTILE_JSON])
def test_hostile_json_raises_a_short_tunevec_error(obj, words):
    message = _error(Spec.from_json, obj)
    for word in words:
        assert word in message, message


def test_direct_construction_with_a_huge_int_coefficient_is_a_tunevec_error():
    with pytest.raises(TunevecError, match="finite"):
        Component("medical", 10**400)
    with pytest.raises(TunevecError, match="unknown method"):
        Spec((Component("medical"),), method="x" * 10**6)
    with pytest.raises(TunevecError, match="takes no parameter"):
        Spec((Component("medical"),), method="ties", params={"seed": 1})


def test_the_worst_accepted_spec_parses():
    # 256 components of one vector on disjoint layers: the most pairwise checks the limits allow.
    text = "+".join(f"medical[{i}]:0.5" for i in range(MAX_PARSED_COMPONENTS))
    assert len(Spec.parse(text).components) == MAX_PARSED_COMPONENTS
    obj = {f"medical[{i}]": 0.5 for i in range(MAX_PARSED_COMPONENTS)}
    assert Spec.from_json(obj) == Spec.parse(text)
