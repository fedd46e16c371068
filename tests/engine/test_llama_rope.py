"""llama3-style RoPE scaling: our rope_freqs factors against transformers' own llama3 init."""

from __future__ import annotations

import numpy as np

from quantyard.engine.gguf.archs.llama import llama3_rope_factors


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters=rope,
                         max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = 2048 // 32
    plain = 1.0 / (500000.0 ** (np.arange(0, dim, 2, dtype=np.float64) / dim))  # unscaled RoPE
    # llama.cpp divides each frequency by its factor: factor = unscaled / scaled
    want = plain / scaled.double().numpy()
    got = llama3_rope_factors(config.to_dict())
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got.min() == 1.0 and got.max() == 32.0
