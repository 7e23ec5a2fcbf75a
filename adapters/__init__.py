"""A library of adapters (LoRA or sparse) trained on one base model: storage, merging, routing, clustering.

- ``adapters.library``: the library on disk (``AdapterLibrary``, ``Expert``, ``LibraryError``, ``base_model_hash``)
- ``adapters.files``: one expert's files: PEFT LoRA state helpers, content hashes, the meta derived from the files
- ``adapters.merge``: merging LoRA deltas and sparse deltas (pure tensor functions)
- ``adapters.sparse``: sparse adapters chosen by connection sensitivity (``SparseAdapter``)
- ``adapters.arrow``: Arrow routing (prototypes, routing weights, routed forward, PEFT Arrow model)
- ``adapters.cluster``: model-based clustering (MBC) of experts and each cluster's union of training data
- ``adapters.cli``: ``rl library ...``
"""

from adapters.arrow import arrow_lora_forward, arrow_route, build_peft_arrow_model, expert_prototypes, peft_arrow_routing
from adapters.cluster import cluster_experts, expert_vectors, kmeans_labels, reduce_svd, sparsify_quantile, write_cluster_data
from adapters.files import LibraryError, base_model_hash, lora_pairs, lora_scaling, pairs_to_state
from adapters.library import AdapterLibrary, Expert, validate_name
from adapters.merge import lora_delta, merge_lora_uniform, merge_lora_weighted, merge_sparse, refactor_to_lora
from adapters.sparse import SparseAdapter, apply_sparse_delta, connection_sensitivity_mask, read_sparse_dir, sensitivity_inputs

__all__ = [
    "AdapterLibrary",
    "Expert",
    "LibraryError",
    "SparseAdapter",
    "apply_sparse_delta",
    "arrow_lora_forward",
    "arrow_route",
    "base_model_hash",
    "build_peft_arrow_model",
    "cluster_experts",
    "connection_sensitivity_mask",
    "expert_prototypes",
    "expert_vectors",
    "kmeans_labels",
    "lora_delta",
    "lora_pairs",
    "lora_scaling",
    "merge_lora_uniform",
    "merge_lora_weighted",
    "merge_sparse",
    "pairs_to_state",
    "peft_arrow_routing",
    "read_sparse_dir",
    "reduce_svd",
    "refactor_to_lora",
    "sensitivity_inputs",
    "sparsify_quantile",
    "validate_name",
    "write_cluster_data",
]
