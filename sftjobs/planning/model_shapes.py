"""The model shapes sftjobs knows without a download: the synthetic models' dimensions (the real Qwen2.5
shapes, random weights) that the model step builds and the memory plan estimates from."""

from __future__ import annotations

from typing import Any

SYNTHETIC_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden": 64, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": None,
             "max_positions": 4096, "dtype": "float32"},
    "qwen2.5-0.5b": {"hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2, "vocab": 151936,
                     "max_positions": 32768, "dtype": "bfloat16"},
    "qwen2.5-3b": {"hidden": 2048, "intermediate": 11008, "layers": 36, "heads": 16, "kv_heads": 2, "vocab": 151936,
                   "max_positions": 32768, "dtype": "bfloat16"},
}
# Real shapes get a larger tokenizer (fewer tokens per word, closer to Qwen's ~4 characters a token).
REAL_SHAPE_TOKENIZER_VOCAB = 8192
DEMO_TOKENIZER_VOCAB = 1500  # the tiny shape's tokenizer (its vocab is the tokenizer's)
