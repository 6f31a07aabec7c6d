"""Built-in model shapes by name, for analysis and profiling without a checkpoint."""

from __future__ import annotations

from jaxllm.config import ModelConfig

__all__ = ["NAMED_CONFIGS"]

NAMED_CONFIGS: dict[str, ModelConfig] = {
    # The textbook model: H=4096, D(head)=128, H'=11008, 32 layers, MHA.
    "llama2-7b": ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                             rms_norm_eps=1e-5, max_position_embeddings=4096,
                             bos_token_id=1, eos_token_ids=(2,)),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                             rms_norm_eps=1e-5, rope_theta=500000.0,
                             max_position_embeddings=8192),
    "llama3-70b": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                              num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                              rms_norm_eps=1e-5, rope_theta=500000.0,
                              max_position_embeddings=8192),
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                                rms_norm_eps=1e-5, rope_theta=100000.0,
                                max_position_embeddings=8192, tie_word_embeddings=True),
}
