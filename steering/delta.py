"""From a spec to one checkpoint tensor's delta: the components that apply to it, merged by the spec's method.

This is where a ``Spec`` (pure data, ``tunevec.steering.spec``) meets tensors; the method's function comes from its
record in the registry (``tunevec.steering.merge.METHODS``), so there is no per-method dispatch here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tunevec.steering.spec import Spec


def delta_for(spec: Spec, name: str, taus: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The merged float32 delta for checkpoint tensor ``name``, or None if no component applies.

    ``taus`` maps vector name to that vector's τ for this tensor. A vector absent from ``taus`` counts as
    τ = 0 here (an artifact may omit tensors its tuning left unchanged). The merge runs over the components
    that apply to this tensor, in canonical order; DARE draws its masks from ``dare_generator(seed, name)``,
    so the result depends only on the spec and the inputs, not on streaming order or process.
    """
    parts = [(c.alpha, taus[c.vector]) for c in spec.components if c.vector in taus and c.applies_to(name)]
    if not parts:
        return None
    alphas = [alpha for alpha, _ in parts]
    tensors = [tau for _, tau in parts]
    return spec.merge_method.merge(tensors, alphas, dict(spec.params), name)
