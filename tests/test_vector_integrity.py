"""A tuning-vector artifact that is damaged, hand-edited or swapped is refused with the file and field named.

Issue 12 finding 9 (vector integrity): content is checked before it is served, once per version of the file; a
malformed manifest or header raises TunevecError, never a raw exception. Also the content digest the server uses as
a vector's identity, and extraction's temp folder (finding 8).
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from synthetic import llama_like, perturbed, write_model

from tunevec.core import vector as vector_module
from tunevec.core.errors import TunevecError
from tunevec.core.extract import extract
from tunevec.core.vector import MANIFEST_FILE, TENSORS_FILE, VERIFIED_FILE, TuningVector

UP0 = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture
def artifact(tmp_path):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base, seed=1))
    extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    vector_module._VERIFIED.clear()  # each test starts as a fresh process would
    return tmp_path / "v"


def _flip_byte_keeping_size(path):
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))


def _count_hashing(monkeypatch) -> dict[str, int]:
    calls = {"n": 0}
    real = vector_module._hash_range

    def counting(f, info):
        calls["n"] += 1
        return real(f, info)

    monkeypatch.setattr(vector_module, "_hash_range", counting)
    return calls


# --- content verification ---------------------------------------------------------------------------------------


def test_flipped_bytes_of_the_same_size_are_refused_on_read_and_stream(artifact):
    _flip_byte_keeping_size(artifact / TENSORS_FILE)
    vec = TuningVector(artifact)  # opening reads only the manifest and the header
    with pytest.raises(TunevecError, match=r"vector\.safetensors: checksum mismatch for tensor"):
        vec.read(UP0)
    with pytest.raises(TunevecError, match="checksum mismatch"):
        next(vec.stream())


def test_content_is_hashed_once_per_version_of_the_file(artifact, monkeypatch):
    calls = _count_hashing(monkeypatch)
    vec = TuningVector(artifact)
    n = len(vec.names())
    vec.read(UP0)
    list(vec.stream())
    TuningVector(artifact).read(UP0)
    assert calls["n"] == n  # one pass over the tensors, then remembered in this process
    # A later process trusts the stamp written beside the artifact for the same file version.
    assert (artifact / VERIFIED_FILE).exists()
    vector_module._VERIFIED.clear()
    TuningVector(artifact).read(UP0)
    assert calls["n"] == n
    # A rewritten file (new mtime, maybe a new inode) is checked again, stamp or not.
    _flip_byte_keeping_size(artifact / TENSORS_FILE)
    with pytest.raises(TunevecError, match="checksum mismatch"):
        TuningVector(artifact).read(UP0)


def test_a_stamp_for_another_manifest_does_not_vouch_for_this_one(artifact, monkeypatch):
    TuningVector(artifact).read(UP0)
    vector_module._VERIFIED.clear()
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    manifest["tensors"][UP0]["sha256"] = "0" * 64
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(TunevecError, match=f"checksum mismatch for tensor '{UP0}'"):
        TuningVector(artifact).read(UP0)


def test_a_read_only_folder_is_verified_per_process_without_a_stamp(artifact, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(vector_module, "write_file_atomically", refuse)
    calls = _count_hashing(monkeypatch)
    TuningVector(artifact).read(UP0)
    TuningVector(artifact).read(UP0)
    assert not (artifact / VERIFIED_FILE).exists()
    assert calls["n"] == len(TuningVector(artifact).names())


def test_verify_always_rereads(artifact, monkeypatch):
    vec = TuningVector(artifact)
    vec.verify()
    calls = _count_hashing(monkeypatch)
    vec.verify()
    assert calls["n"] == len(vec.names())


# --- content digest ------------------------------------------------------------------------------------------------


def test_content_digest_follows_content_not_location_and_reads_no_tensor(artifact, tmp_path, monkeypatch):
    monkeypatch.setattr(
        vector_module, "_hash_range", lambda f, info: pytest.fail("content_digest read tensors")
    )
    digest = TuningVector(artifact).content_digest
    assert len(digest) == 64 and int(digest, 16) >= 0
    shutil.copytree(artifact, tmp_path / "copy")
    assert TuningVector(tmp_path / "copy").content_digest == digest
    write_model(tmp_path / "t2", perturbed(llama_like(0), seed=2))
    monkeypatch.undo()
    same_name = TuningVector(artifact).name
    other = extract(tmp_path / "b", tmp_path / "t2", tmp_path / "v2", name=same_name, progress=False)
    assert other.content_digest != digest


# --- malformed manifests -------------------------------------------------------------------------------------------


def _edit(manifest: dict, path: tuple, value) -> dict:
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return manifest


MALFORMED = [
    ("name", ("name",), 5, ["field name", "non-empty string", "5"]),
    ("empty name", ("name",), "", ["field name"]),
    ("dtype", ("dtype",), "int8", ["field dtype", "float32", "'int8'"]),
    ("base", ("base",), [], ["field base", "object"]),
    ("fingerprint", ("base", "fingerprint"), 12, ["field base.fingerprint", "string"]),
    ("tensors", ("tensors",), [], ["field tensors", "object"]),
    ("entry", ("tensors", UP0), "x", [f"field tensors['{UP0}']", "object"]),
    ("norm", ("tensors", UP0, "norm"), "abc", [f"tensors['{UP0}'].norm", "non-negative number", "'abc'"]),
    ("nan norm", ("tensors", UP0, "norm"), float("nan"), [".norm", "non-negative number"]),
    ("bool norm", ("tensors", UP0, "base_norm"), True, [".base_norm", "number"]),
    ("sha256 type", ("tensors", UP0, "sha256"), 123, [".sha256", "64 lowercase hex"]),
    ("sha256 text", ("tensors", UP0, "sha256"), "zz", [".sha256", "64 lowercase hex"]),
    ("entry name", ("tensors", UP0, "name"), 7, [".name", "the tensor's own name"]),
    ("shape type", ("tensors", UP0, "shape"), "16x8", [".shape", "non-negative integers"]),
    ("shape entries", ("tensors", UP0, "shape"), [16, -8], [".shape"]),
    ("shape bool", ("tensors", UP0, "shape"), [True, 8], [".shape"]),
    ("role", ("tensors", UP0, "role"), "ffn", [".role", "attention"]),
    ("layer", ("tensors", UP0, "layer"), "0", [".layer", "integer or null"]),
    ("module", ("tensors", UP0, "module"), 3, [".module", "string or null"]),
    ("policies", ("policies",), [1], ["field policies"]),
    ("created", ("created",), 1, ["field created"]),
    ("version", ("version",), True, ["version True is not supported"]),
    ("format", ("format",), {"x": 1}, ["not a tunevec tuning vector"]),
]


@pytest.mark.parametrize(("case", "path", "value", "words"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_every_malformed_manifest_field_is_named(artifact, case, path, value, words):
    mpath = artifact / MANIFEST_FILE
    mpath.write_text(json.dumps(_edit(json.loads(mpath.read_text()), path, value)))
    with pytest.raises(TunevecError) as info:
        TuningVector(artifact)
    message = str(info.value)
    assert str(mpath) in message
    for word in words:
        assert word in message


def test_a_missing_manifest_field_is_named(artifact):
    mpath = artifact / MANIFEST_FILE
    manifest = json.loads(mpath.read_text())
    del manifest["tensors"][UP0]["sha256"]
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(TunevecError, match=rf"field tensors\['{UP0}'\]\.sha256 is missing"):
        TuningVector(artifact)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"[1, 2]", ["must be a JSON object", "list"]),
        (b'{"format": "tunevec.tuning-vector", "name": "\xff\xfe"}', ["not UTF-8"]),
        (b"{not json", ["invalid JSON"]),
        (b"[" * 100_000 + b"]" * 100_000, ["invalid JSON"]),
        (b'{"version": ' + b"9" * 5000 + b"}", ["invalid JSON"]),
        (b'"just a string"', ["must be a JSON object", "str"]),
    ],
    ids=["list", "non-utf8", "syntax", "deep", "huge-int", "string"],
)
def test_a_manifest_that_is_not_a_json_object_is_refused(artifact, raw, words):
    (artifact / MANIFEST_FILE).write_bytes(raw)
    with pytest.raises(TunevecError) as info:
        TuningVector(artifact)
    assert str(artifact / MANIFEST_FILE) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_a_manifest_that_is_a_folder_is_refused(artifact):
    (artifact / MANIFEST_FILE).unlink()
    (artifact / MANIFEST_FILE).mkdir()
    with pytest.raises(TunevecError, match="cannot read the manifest"):
        TuningVector(artifact)


# --- malformed tensors file ----------------------------------------------------------------------------------------


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + n]))
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))  # keep the data offsets valid where the new header fits
    assert len(new) == n
    path.write_bytes(raw[:8] + new + raw[8 + n :])


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda h: [1, 2], ["malformed safetensors header"]),
        (lambda h: {**h, UP0: {**h[UP0], "shape": ["a", 8]}}, ["vector.safetensors"]),
        (lambda h: {**h, UP0: {**h[UP0], "shape": [8, 16]}}, ["shape [8, 16]", "manifest says [16, 8]"]),
        (lambda h: {**h, UP0: {**h[UP0], "dtype": "I32"}}, ["stored as I32", "manifest's dtype is float32"]),
        (lambda h: {k: v for k, v in h.items() if k != UP0}, ["list different tensors"]),
    ],
    ids=["not-an-object", "shape-type", "shape-differs", "dtype-differs", "tensor-missing"],
)
def test_a_malformed_safetensors_header_is_refused(artifact, edit, words):
    _rewrite_header(artifact / TENSORS_FILE, edit)
    with pytest.raises(TunevecError) as info:
        TuningVector(artifact)
    for word in words:
        assert word in str(info.value)


# --- extraction's temp folder --------------------------------------------------------------------------------------


def test_extraction_leaves_another_containers_temp_folder_alone(tmp_path, monkeypatch):
    base = llama_like(0)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "t", perturbed(base, seed=1))
    # Another container extracting to the same volume is also PID 1; the old name was .v.tmp-<pid>.
    monkeypatch.setattr(os, "getpid", lambda: 1)
    theirs = tmp_path / ".v.tmp-1"
    theirs.mkdir()
    (theirs / "vector.safetensors").write_bytes(b"in progress")
    extract(tmp_path / "b", tmp_path / "t", tmp_path / "v", progress=False)
    assert (theirs / "vector.safetensors").read_bytes() == b"in progress"
    TuningVector(tmp_path / "v").verify()
