"""Random in-memory weights for the parallel tests (no checkpoint on disk needed)."""

from __future__ import annotations

from qwen35_export.checkpoint.writer import random_tensor
from qwen35_export.config import Qwen35Config
from qwen35_export.model.weights import ModelWeights, global_weight_shapes, layer_weight_shapes


def random_weights(cfg: Qwen35Config, seed: int = 0) -> ModelWeights:
    """fp32 weights drawn as `write_random_checkpoint` draws them, fused experts."""
    glob = {n: random_tensor(n, s, seed) for n, s in global_weight_shapes(cfg).items()}
    layers = [{n: random_tensor(f"layers.{i}.{n}", s, seed) for n, s in layer_weight_shapes(cfg, i).items()}
              for i in range(cfg.num_hidden_layers)]
    return ModelWeights(cfg, glob, layers)
