"""Pallas kernels (GPU Triton lowering; ``interpret=True`` on CPU) and their
plain-jnp references.  The model never calls these directly: ``jaxllm.attention`` picks
the attention implementation, ``jaxllm.models.llama.matmul`` the matmul one.

* ``flash_attention.flash_attention`` -- prefill / training, forward + backward (custom_vjp), GQA,
  causal, segment ids, sliding window, soft cap.
* ``paged_attention.paged_decode_attention`` -- one query per sequence over a paged KV pool,
  flash-decoding split-K, optional int8 K/V with per-token scales.
* ``ragged_attention.ragged_paged_attention`` -- flat batch of prefill-chunk and decode tokens over
  the paged pool.
* ``quant_matmul.quantized_matmul`` -- small-M matmul over int8 / int4 / GGUF-block quantized
  weights, dequantized tile by tile in registers (opt-in on GPU until timed there).
* :mod:`pallas_kernels.reference` -- the slow, obviously-correct versions.

See docs/kernels.md for layouts, grids and block sizes.
"""

# Submodules are not re-exported: a function re-exported under its module's name would
# shadow the module (``pallas_kernels.flash_attention.flash_attention`` must keep working).
__all__ = ["flash_attention", "paged_attention", "quant_matmul", "ragged_attention", "reference"]
