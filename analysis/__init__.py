"""Pure math over tuning vectors: spectra and factorisation, alignment with the base weight, representation
change, cross-domain similarity. No file I/O and no models; tensors in, numbers out."""

from tunevec.analysis.alignment import (
    alignment_summary,
    amplification_split,
    principal_directions,
    split_energy,
    subspace_share,
)
from tunevec.analysis.representation import PrincipalAngles, change_dimensions, linear_cka, principal_angles
from tunevec.analysis.similarity import PairSums, SimilarityAccumulator, cosine, pair_sums, sign_agreement
from tunevec.core.linalg import (
    LowRank,
    allocate_ranks,
    effective_rank,
    energy_at_ranks,
    factorise,
    randomized_svd,
    rank_for_energy,
    singular_values,
    stable_rank,
)

__all__ = [
    "LowRank",
    "PairSums",
    "PrincipalAngles",
    "SimilarityAccumulator",
    "alignment_summary",
    "allocate_ranks",
    "amplification_split",
    "change_dimensions",
    "cosine",
    "effective_rank",
    "energy_at_ranks",
    "factorise",
    "linear_cka",
    "pair_sums",
    "principal_angles",
    "principal_directions",
    "randomized_svd",
    "rank_for_energy",
    "sign_agreement",
    "singular_values",
    "split_energy",
    "stable_rank",
    "subspace_share",
]
