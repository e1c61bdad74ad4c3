"""Permutation alignment of same-architecture networks by weight or activation matching (Git Re-Basin;
docs/alignment.md).
Names load from their submodules on first use (PEP 562): ``AlignmentError`` needs no torch."""

from __future__ import annotations

from medmerge.lazy import lazy_exports

#: public name -> the submodule that defines it
_EXPORTS = {
    "AlignmentError": "spec",
    "Concat": "spec",
    "Local": "spec",
    "PermutationSpec": "spec",
    "permutation_spec": "tracing",
    "apply_permutations": "apply",
    "random_permutations": "apply",
    "feature_sites": "activations",
    "feature_statistics": "activations",
    "SpaceStatistics": "activations",
    "activation_matching": "activation_matching",
    "alignment_similarity": "matching",
    "weight_matching": "matching",
    "load_permutations": "io",
    "save_permutations": "io",
    "align_sources": "sources",
    "alignment_skeleton": "sources",
    "apply_saved_permutations": "sources",
    "align_sources_by_activations": "sources",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
