"""Pruning: boolean mask pytrees, magnitude / N:M masks, `prune_tree` with the path selection of
`quantize_tree`, Wanda, SparseGPT (shared OBS sweep, joint sparsity + quantization), oBERT with
M-FAC inverse-Fisher-vector products, and gradual magnitude pruning as an Optax transformation.

Masks are boolean arrays of their leaf's shape, True = keep, in a tree of the parameters'
structure with None at unpruned leaves (`feynkit.compression.prune.masks`). A `PruneRecipe`
(``magnitude_recipe``, ``wanda_recipe``, ``sparsegpt_recipe``, ``obert_recipe``) prunes the
leaves its regexes select:

    pruned, masks = prune_tree(params, magnitude_recipe(0.5), where=LINEAR_KERNELS)
"""

from feynkit.compression.prune.gradual import (
    GradualPruningState,
    cubic_sparsity,
    gradual_magnitude_pruning,
    pruning_masks,
)
from feynkit.compression.prune.magnitude import (
    global_magnitude_masks,
    magnitude_mask,
    magnitude_recipe,
)
from feynkit.compression.prune.masks import (
    apply_masks,
    check_masks,
    check_nm,
    check_pattern,
    check_sparsity,
    is_nm_sparse,
    kernel_matrix,
    mask_sparsity,
    nm_mask,
    pattern_mask,
    sparse_storage_bits,
    topk_mask,
)
from feynkit.compression.prune.mfac import MFAC, mfac, mfac_diag, mfac_ifvp
from feynkit.compression.prune.obert import (
    collect_gradients,
    obert_prune,
    obert_recipe,
    obert_saliency,
)
from feynkit.compression.prune.recipe import (
    FisherCalibration,
    GradientStats,
    PruneRecipe,
    PruneResult,
    prune_layerwise,
    prune_tree,
)
from feynkit.compression.prune.recipes import RECIPES
from feynkit.compression.prune.sparsegpt import mask_block, sparsegpt_prune, sparsegpt_recipe
from feynkit.compression.prune.wanda import wanda_mask, wanda_recipe, wanda_scores

__all__ = [
    "MFAC",
    "RECIPES",
    "FisherCalibration",
    "GradientStats",
    "GradualPruningState",
    "PruneRecipe",
    "PruneResult",
    "apply_masks",
    "check_masks",
    "check_nm",
    "check_pattern",
    "check_sparsity",
    "collect_gradients",
    "cubic_sparsity",
    "global_magnitude_masks",
    "gradual_magnitude_pruning",
    "is_nm_sparse",
    "kernel_matrix",
    "magnitude_mask",
    "magnitude_recipe",
    "mask_block",
    "mask_sparsity",
    "mfac",
    "mfac_diag",
    "mfac_ifvp",
    "nm_mask",
    "obert_prune",
    "obert_recipe",
    "obert_saliency",
    "pattern_mask",
    "prune_layerwise",
    "prune_tree",
    "pruning_masks",
    "sparse_storage_bits",
    "sparsegpt_prune",
    "sparsegpt_recipe",
    "topk_mask",
    "wanda_mask",
    "wanda_recipe",
    "wanda_scores",
]

# prune_b: FLAP (structured), DARE and merging, WINA activation sparsity, EvoPress
from feynkit.compression.prune.dare import (  # noqa: E402
    dare,
    dare_delta,
    dare_merge,
    darex_q_search,
    delta_masks,
    merge_deltas,
    task_vector,
)
from feynkit.compression.prune.evopress import (  # noqa: E402
    EvoPressDatabase,
    EvoPressResult,
    assemble,
    average_sparsity,
    build_database,
    evopress_search,
    kl_fitness,
    kl_search_from_uniform,
    level_switch,
    size_groups,
)
from feynkit.compression.prune.flap import (  # noqa: E402
    FLAP_STRUCTURES,
    FlapPlan,
    FlapStatistics,
    flap,
    flap_plan,
    flap_prune,
    flap_scores,
    flap_statistics,
    fluctuation_scores,
)
from feynkit.compression.prune.wina import (  # noqa: E402
    ACTIVATION_METHODS,
    activation_mask,
    activation_scores,
    sparse_activation_apply,
    sparsify_activations,
)

__all__ += [
    "ACTIVATION_METHODS",
    "EvoPressDatabase",
    "EvoPressResult",
    "FLAP_STRUCTURES",
    "FlapPlan",
    "FlapStatistics",
    "activation_mask",
    "activation_scores",
    "assemble",
    "average_sparsity",
    "build_database",
    "dare",
    "dare_delta",
    "dare_merge",
    "darex_q_search",
    "delta_masks",
    "evopress_search",
    "flap",
    "flap_plan",
    "flap_prune",
    "flap_scores",
    "flap_statistics",
    "fluctuation_scores",
    "kl_fitness",
    "kl_search_from_uniform",
    "level_switch",
    "merge_deltas",
    "size_groups",
    "sparse_activation_apply",
    "sparsify_activations",
    "task_vector",
]
