"""Extraction: tau = theta_tuned - theta_base, streamed tensor by tensor into a tuning-vector artifact.

Plans first (which tensors, which policy for each mismatch) so a pair that cannot give a defined tau fails before
any tensor is read; then holds at most one tensor pair in memory, reading into reused buffers.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from tunevec.core.checkpoint import ST_FLOAT_DTYPES, Checkpoint, ResolvedModel, resolve_model
from tunevec.core.errors import TunevecError
from tunevec.core.files import StagedFolder
from tunevec.core.roles import classify
from tunevec.core.vector import (
    DTYPES,
    FORMAT,
    TENSORS_FILE,
    Manifest,
    SafetensorsWriter,
    TensorEntry,
    TuningVector,
)


def plan_extraction(
    base: Checkpoint, tuned: Checkpoint, *, allow_config_changes: bool = False
) -> tuple[list[tuple[str, tuple[int, ...]]], dict]:
    """Decide which tensors tau covers and how mismatches are handled, before any tensor is read.

    Returns the (name, shape) plan and the policies report. Raises on mismatches that have no safe policy; the
    policies are documented in docs/artifact-format.md ("Mismatch policies").
    """
    if base.architecture != tuned.architecture:
        raise TunevecError(
            f"architectures differ: base {base.path} is {base.architecture}, tuned {tuned.path} is "
            f"{tuned.architecture}; a tuning vector needs a fine-tune of the same model"
        )
    if base.tie_word_embeddings != tuned.tie_word_embeddings:
        raise TunevecError(
            f"tied embeddings differ: base {base.path} has tie_word_embeddings={base.tie_word_embeddings}, tuned "
            f"{tuned.path} has {tuned.tie_word_embeddings}. base + tau would keep the base's head wiring and not "
            "reproduce the tuned model. Extract against a base saved the tuned way (untie: copy the embedding into "
            "the head tensor and set tie_word_embeddings=false in a copy of the base folder; tie: only if the "
            "tuned head equals its embedding)"
        )
    arch = base.architecture
    policies: dict = {"tied_embeddings": base.tie_word_embeddings, "vocab_extension": [], "skipped": []}
    policies.update(_config_policies(base, tuned, allow_config_changes))
    b, t = set(base.tensors), set(tuned.tensors)
    # A tied head is the embedding; a checkpoint that stores both copies gets one tau, on the embedding.
    for ckpt, names in ((base, b), (tuned, t)):
        if ckpt.tie_word_embeddings:
            names -= {n for n in ckpt.tensors if classify(n, arch).role == "head"}
    if b != t:
        only_b, only_t = sorted(b - t), sorted(t - b)
        raise TunevecError(
            f"tensor names differ ({len(only_b)} only in base, e.g. {only_b[:3]}; {len(only_t)} only in tuned, "
            f"e.g. {only_t[:3]}); both checkpoints must come from the same architecture"
        )
    plan: list[tuple[str, tuple[int, ...]]] = []
    for name in base.names():
        if name not in b:
            continue
        bi, ti = base.tensors[name], tuned.tensors[name]
        if not (bi.dtype in ST_FLOAT_DTYPES and ti.dtype in ST_FLOAT_DTYPES):
            policies["skipped"].append({"tensor": name, "reason": f"non-float dtype {bi.dtype}"})
            continue
        if bi.shape == ti.shape:
            plan.append((name, bi.shape))
            continue
        grown = (
            classify(name, arch).role in ("embedding", "head")
            and len(bi.shape) == 2
            and bi.shape[1] == ti.shape[1]
            and ti.shape[0] > bi.shape[0]
        )
        if not grown:
            raise TunevecError(f"shape mismatch for {name!r}: base {bi.shape}, tuned {ti.shape}")
        policies["vocab_extension"].append(
            {
                "tensor": name,
                "base_rows": bi.shape[0],
                "tuned_rows": ti.shape[0],
                "added_rows": ti.shape[0] - bi.shape[0],
            }
        )
        plan.append((name, bi.shape))
    rows = [base.tensors[n].shape[0] for n in b if classify(n, arch).role == "embedding"]
    policies["tokenizer"] = _tokenizer_policy(base, tuned, min(rows) if rows else None)
    return plan, policies


def _config_policies(base: Checkpoint, tuned: Checkpoint, allow: bool) -> dict:
    """Weight dtypes and runtime settings (rope, norms, windows, caps) of both sides, compared.

    Different weight dtypes are defined (tau is the float32 difference) and recorded. Different runtime settings
    are refused unless ``allow``: base + tau is served with the base's config, so a tuned model that runs with
    another rope base or scaling would be served as a different model than the one tuned, without a word.
    """
    out: dict = {}
    dtypes = {"base": base.weight_dtypes(), "tuned": tuned.weight_dtypes()}
    if dtypes["base"] != dtypes["tuned"]:
        out["dtypes"] = dtypes
    b, t = base.runtime_settings(), tuned.runtime_settings()
    changes = {k: {"base": b[k], "tuned": t[k]} for k in sorted(set(b) & set(t)) if b[k] != t[k]}
    if changes and not allow:
        shown = "; ".join(f"{k}: base {v['base']!r}, tuned {v['tuned']!r}" for k, v in changes.items())
        raise TunevecError(
            f"the tuned model runs with other settings than the base ({shown}). base + tau is served with the "
            f"base's config ({base.path / 'config.json'}), so it would not reproduce the tuned model. Either "
            "extract against a copy of the base folder whose config.json carries the tuned settings (then serve "
            "that copy), or pass --allow-config-change to extract anyway (recorded in policies.config_changes, "
            "e.g. to analyse tau)"
        )
    if changes:
        out["config_changes"] = changes
    return out


_TOKENS_SHOWN = 20


def _tokenizer_policy(base: Checkpoint, tuned: Checkpoint, rows: int | None) -> dict:
    """Compare the two tokenizers (tokenizer.json) id by id over the base model's ``rows`` embedding rows.

    tau of an embedding or head row only means something if the row is the same token on both sides:
    - a regular token with another id (another tokenizer altogether) is refused;
    - a special token the fine-tune renamed (Llama 3's reserved tokens turned into chat markers) is allowed and
      listed, as is a token the tuned tokenizer added on a row the base model already had (a padded vocabulary):
      base + tau has the tuned rows, but only the tuned tokenizer turns their text into those ids
      (``needs_tuned_tokenizer``);
    - tokens beyond the base's rows (a resized vocabulary) are listed as ``beyond_base_rows``: base + tau has no
      rows for them, so it neither reads nor emits them.
    """
    b, t = base.token_table(), tuned.token_table()
    if b is None or t is None:
        return {"compared": False, "reason": "no tokenizer.json in " + ("base" if b is None else "tuned")}
    limit = rows if rows is not None else max(b, default=-1) + 1
    renamed, regular, new_rows, beyond = [], [], [], []
    for i in sorted(t):
        if i >= limit:
            beyond.append({"id": i, "token": t[i][0]})
        elif i not in b:
            new_rows.append({"id": i, "token": t[i][0]})
        elif b[i][0] != t[i][0]:
            renamed.append({"id": i, "base": b[i][0], "tuned": t[i][0]})
            if not (b[i][1] or t[i][1]):
                regular.append(renamed[-1])
    if regular:
        ex = ", ".join(f"id {c['id']}: {c['base']!r} vs {c['tuned']!r}" for c in regular[:3])
        raise TunevecError(
            f"the tokenizers differ: {len(regular)} regular tokens have other ids in {tuned.path} than in "
            f"{base.path} (e.g. {ex}), so embedding rows of the same index are different tokens and tau is not "
            "defined; extract against the base the fine-tune started from, with its tokenizer"
        )
    return {
        "compared": True,
        "same": not (renamed or new_rows or beyond),
        "renamed_special": renamed[:_TOKENS_SHOWN],
        "renamed_special_count": len(renamed),
        "new_in_base_rows": new_rows[:_TOKENS_SHOWN],
        "new_in_base_rows_count": len(new_rows),
        "beyond_base_rows": beyond[:_TOKENS_SHOWN],
        "beyond_base_rows_count": len(beyond),
        "needs_tuned_tokenizer": bool(renamed or new_rows),
    }


def extract(
    base_ref: str | os.PathLike[str],
    tuned_ref: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    name: str | None = None,
    dtype: str = "auto",
    force: bool = False,
    progress: bool = True,
    base_revision: str | None = None,
    tuned_revision: str | None = None,
    allow_config_changes: bool = False,
    device: torch.device | str | None = None,
) -> TuningVector:
    """Stream tau = tuned - base into an artifact at ``out``; at most one tensor pair is in memory at a time.

    ``base_ref`` and ``tuned_ref`` are model folders or Hugging Face ids (``resolve_model``; revisions pin hub
    ids). The vector is named ``name``, else after the ``out`` folder (``vectors/medical`` -> ``medical``), the
    name requests use to find it.

    The shared rows of an enlarged vocabulary are kept (tau covers the base's rows) and the added rows are
    reported in ``policies.vocab_extension`` with their norm.

    ``dtype="auto"`` stores tau in the checkpoints' own float dtype (float32 when they differ). tau is always
    computed in float32; the difference of two bf16 numbers within a factor 2 of each other is exact in bf16
    (Sterbenz), so storing it narrow rarely rounds, and where it does the manifest says how much
    (``policies.rounding``). Half the bytes to hash and write as a float32 tau of a bf16 model.

    ``device`` (default cpu) is where the arithmetic runs: on CUDA each tensor pair travels in its stored dtype,
    is converted, subtracted, measured and rounded there, and only the stored tau comes back for hashing and
    writing, which stay on the host. Device memory then holds one tensor pair (``_DeviceStep``).
    """
    from tqdm import tqdm

    if dtype != "auto" and dtype not in DTYPES:
        raise TunevecError(f"dtype {dtype!r} not supported; choose auto or one of {sorted(DTYPES)}")
    out = Path(out)
    if out.exists() and not force:
        raise TunevecError(f"{out} already exists; pass --force to replace it")
    base_src, tuned_src = resolve_model(base_ref, base_revision), resolve_model(tuned_ref, tuned_revision)
    base, tuned = Checkpoint(base_src.path), Checkpoint(tuned_src.path)
    plan, policies = plan_extraction(base, tuned, allow_config_changes=allow_config_changes)
    if dtype == "auto":
        dtype = _common_dtype(base, tuned, [n for n, _ in plan])
    vname = name or out.resolve().name
    torch_dtype = DTYPES[dtype]
    t0 = time.perf_counter()

    staged = StagedFolder(out, replace=force)
    tmp = staged.path
    try:
        writer = SafetensorsWriter(
            tmp / TENSORS_FILE, [(n, torch_dtype, s) for n, s in plan], {"format": FORMAT, "name": vname}
        )
        grown = {v["tensor"]: v for v in policies["vocab_extension"]}
        entries: dict[str, TensorEntry] = {}
        total = sum(base.tensors[n].nbytes + tuned.tensors[n].nbytes for n, _ in plan)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {vname}", disable=not progress)
        # Hashing and writing tensor i (hashlib and file writes release the GIL) overlaps reading and subtracting
        # tensor i+1; at most one tensor waits for the writer, so memory stays bounded.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunevec-writer") as pool:
            pending: tuple[str, Future] | None = None
            buffers = _Buffers()
            rounding = _Rounding()
            on_device = _DeviceStep(torch.device(device)) if device is not None else None
            if on_device is not None and on_device.device.type == "cpu":
                on_device = None
            for i, (name_, shape) in enumerate(plan):
                if on_device is not None:
                    entries[name_], stored = on_device.step(
                        base, tuned, name_, shape, torch_dtype, grown.get(name_), rounding, buffers, i
                    )
                    if pending is not None:
                        entries[pending[0]].sha256 = pending[1].result()
                    pending = (name_, pool.submit(writer.write, name_, stored))
                    del stored
                    bar.update(base.tensors[name_].nbytes + tuned.tensors[name_].nbytes)
                    continue
                w_base = base.read_into(name_, buffers.get("base", torch.float32, shape))
                # tau is computed in place in the tuned buffer; when it is also what gets written, two buffers
                # take turns, since the writer may still hold the previous tensor's.
                slot = f"tuned{i % 2}" if torch_dtype == torch.float32 else "tuned"
                w_tuned = tuned.read_into(name_, buffers.get(slot, torch.float32, tuned.tensors[name_].shape))
                if name_ in grown:
                    added = w_tuned[shape[0] :]
                    grown[name_]["added_rows_norm"] = float(added.norm())
                    w_tuned = w_tuned[: shape[0]]
                tau = w_tuned.sub_(w_base)
                entries[name_] = _entry(name_, shape, tau, w_base, base.architecture)
                if torch_dtype == torch.float32:
                    stored = tau
                else:
                    stored = buffers.get(f"out{i % 2}", torch_dtype, shape).copy_(tau)
                    rounding.add(stored, tau, entries[name_].norm, scratch=w_base)
                del w_base, w_tuned, tau
                if pending is not None:
                    entries[pending[0]].sha256 = pending[1].result()
                pending = (name_, pool.submit(writer.write, name_, stored))
                del stored
                bar.update(base.tensors[name_].nbytes + tuned.tensors[name_].nbytes)
            if pending is not None:
                entries[pending[0]].sha256 = pending[1].result()
        bar.close()
        writer.close()
        if torch_dtype != torch.float32:
            policies["rounding"] = rounding.report(dtype)
        manifest = Manifest(
            name=vname,
            dtype=dtype,
            base=_describe(base, base_src),
            tuned=_describe(tuned, tuned_src),
            tensors=entries,
            policies=policies,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        manifest.policies["extract_seconds"] = round(time.perf_counter() - t0, 3)
        manifest.write(tmp)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    return TuningVector(out)


def _common_dtype(base: Checkpoint, tuned: Checkpoint, names: list[str]) -> str:
    """The one storage dtype of every planned tensor on both sides, if tau can be stored in it; else float32."""
    codes = {c.tensors[n].dtype for c in (base, tuned) for n in names}
    names_by_dtype = {t: name for name, t in DTYPES.items()}
    only = ST_FLOAT_DTYPES.get(codes.pop()) if len(codes) == 1 else None
    return names_by_dtype.get(only, "float32")


class _Rounding:
    """How far storing tau in a narrower dtype moved it from the float32 difference, summed over tensors."""

    def __init__(self) -> None:
        self.tensors = self.entries = self.total = 0
        self.max_abs = self.err_sq = self.tau_sq = 0.0

    def add(self, stored: torch.Tensor, tau: torch.Tensor, tau_norm: float, scratch: torch.Tensor) -> None:
        err = scratch.copy_(stored).sub_(tau)  # scratch: a float32 buffer of tau's shape that is free now
        moved = int(torch.count_nonzero(err))
        self.total += tau.numel()
        self.tau_sq += tau_norm**2
        if moved:
            self.tensors += 1
            self.entries += moved
            self.max_abs = max(self.max_abs, float(err.abs_().max()))
            self.err_sq += float(err.norm()) ** 2

    def report(self, dtype: str) -> dict:
        return {
            "dtype": dtype,
            "tensors_rounded": self.tensors,
            "entries_rounded": self.entries,
            "entries": self.total,
            "max_abs_error": self.max_abs,
            "relative_error": (self.err_sq / self.tau_sq) ** 0.5 if self.tau_sq else 0.0,
        }


class _Buffers:
    """Flat buffers reused across tensors, grown to the largest seen: allocating fresh multi-GB tensors for every
    tensor pair made the kernel's page faulting the largest single cost of extraction (bench/bench_extract.py)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self._flat: dict[str, torch.Tensor] = {}
        self.device = device if device is not None else torch.device("cpu")

    def get(self, key: str, dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._flat.get(key)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self._flat.pop(key, None)  # free the old one before allocating its replacement
            buf = self._flat[key] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel].view(tuple(shape))


class _DeviceStep:
    """One tensor pair's arithmetic on an accelerator: the host reads both tensors in their stored dtype (no
    conversion on the CPU, half the bytes of float32 for a bf16 model), the device converts, subtracts, measures
    and rounds, and the stored tau is copied back into a host buffer for the writer thread.

    Device memory: two float32 tensors of the pair's shape, their two stored-dtype copies and the stored tau,
    i.e. (2·4 + 2·b_in + b_out) bytes per entry of the largest tensor; nothing is kept across tensors but reused
    buffers.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_device = _Buffers(device)

    def step(
        self,
        base: Checkpoint,
        tuned: Checkpoint,
        name: str,
        shape: tuple[int, ...],
        out_dtype: torch.dtype,
        grown: dict | None,
        rounding: _Rounding,
        host: _Buffers,
        i: int,
    ) -> tuple[TensorEntry, torch.Tensor]:
        t_shape = tuned.tensors[name].shape
        raw_b = base.read_into(name, host.get("raw_base", _stored_dtype(base, name), shape))
        raw_t = tuned.read_into(name, host.get("raw_tuned", _stored_dtype(tuned, name), t_shape))
        w_base = self.on_device.get("base", torch.float32, shape).copy_(raw_b.to(self.device))
        w_tuned = self.on_device.get("tuned", torch.float32, t_shape).copy_(raw_t.to(self.device))
        if grown is not None:
            grown["added_rows_norm"] = float(w_tuned[shape[0] :].norm())
            w_tuned = w_tuned[: shape[0]]
        tau = w_tuned.sub_(w_base)
        entry = _entry(name, shape, tau, w_base, base.architecture)
        if out_dtype == torch.float32:
            stored_dev = tau
        else:
            stored_dev = self.on_device.get("out", out_dtype, shape).copy_(tau)
            rounding.add(stored_dev, tau, entry.norm, scratch=w_base)
        # Two host buffers take turns: the writer may still hold the previous tensor's.
        stored = host.get(f"out{i % 2}", out_dtype, shape)
        stored.copy_(stored_dev)
        return entry, stored


def _entry(
    name: str, shape: tuple[int, ...] | list[int], tau: torch.Tensor, w_base: torch.Tensor, architecture: str
) -> TensorEntry:
    """The manifest entry of one tensor of tau (its sha256 is filled in once its bytes are written)."""
    role = classify(name, architecture)
    return TensorEntry(
        name=name,
        shape=list(shape),
        role=role.role,
        layer=role.layer,
        module=role.module,
        norm=float(tau.norm()),
        base_norm=float(w_base.norm()),
        sha256="",
    )


def _stored_dtype(ckpt: Checkpoint, name: str) -> torch.dtype:
    return ST_FLOAT_DTYPES[ckpt.tensors[name].dtype]


def _describe(ckpt: Checkpoint, source: ResolvedModel) -> dict:
    return {
        "path": str(ckpt.path.resolve()),
        "fingerprint": ckpt.fingerprint(),
        "architecture": ckpt.architecture,
        "num_layers": ckpt.num_layers,
        "num_tensors": len(ckpt.tensors),
        **source.describe(),
    }
