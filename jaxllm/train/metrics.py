"""Training observability: FLOP counts / MFU, JSONL metrics, optional TensorBoard."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax

from jaxllm import hardware
from jaxllm.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: all but the embedding lookup
    (the LM head is a matmul, tied or not)."""
    n = cfg.num_params()
    emb = cfg.vocab_size * cfg.hidden_size
    return n if cfg.tie_word_embeddings else n - emb


def train_flops_per_token(cfg: ModelConfig, seq_len: int, lora_params: int | None = None) -> float:
    """Model FLOPs per trained token (forward + backward), the MFU numerator.

    Full fine-tuning: ``6 N`` (2 forward, 2 backward w.r.t. activations, 2 w.r.t.
    weights) plus causal attention ``6 L H hd T`` (PaLM's ``12 L H hd T`` halved by
    the causal mask).  LoRA: frozen weights get no weight gradient, so ``4 N + 6 N_lora``.
    Rematerialisation is not counted (that would be HFU).
    """
    n = matmul_params(cfg)
    attn = 6.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    if lora_params is None:
        return 6.0 * n + attn
    return 4.0 * n + 6.0 * lora_params + attn


def peak_flops(compute_dtype: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """``(peak FLOP/s, where it came from)`` for the default device."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    dev = jax.devices()[0]
    dt = "bf16" if "16" in compute_dtype else "f32"
    if dev.platform == "cpu":
        spec = hardware.get_hardware("cpu")  # measured matmul roof
        return spec.peak(dt), f"measured CPU matmul ({spec.peak(dt) / 1e9:.0f} GFLOP/s)"
    kind = (getattr(dev, "device_kind", "") or "").lower()
    for name, spec in hardware.HARDWARE.items():
        stem = name.lower().split("-")[0]
        if stem in kind.replace(" ", ""):
            return spec.peak(dt), f"{name} datasheet"
    return None, f"unknown device {kind!r} (pass --peak-tflops)"


class MetricsWriter:
    """Append JSON lines (and TensorBoard scalars when asked and available)."""

    def __init__(self, path: str | os.PathLike | None, tensorboard_dir: str | None = None) -> None:
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8") if self.path else None
        self._tb = None
        if tensorboard_dir:
            self._tb = _tensorboard_writer(tensorboard_dir)

    def write(self, step: int, values: Mapping[str, Any], kind: str = "train") -> None:
        row = {"step": int(step), "kind": kind, "time": time.time(),
               **{k: _plain(v) for k, v in values.items()}}
        if self._f:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, int(step))

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(v: Any) -> Any:
    try:
        return float(v) if not isinstance(v, (int, str, bool, list, dict)) else v
    except (TypeError, ValueError):
        return str(v)


def _tensorboard_writer(logdir: str):
    for mod in ("torch.utils.tensorboard", "tensorboardX"):
        try:
            m = __import__(mod, fromlist=["SummaryWriter"])
            return m.SummaryWriter(logdir)
        except Exception:  # noqa: BLE001 -- optional dependency, any import failure
            continue
    print("[jaxllm] --tensorboard: no TensorBoard writer installed (pip install tensorboard); "
          "metrics go to the JSONL file only", file=sys.stderr)
    return None
