"""Calibration for the activation-aware methods (``awq``, ``gptq``, ``w8a8``): the text,
the inputs every linear sees on it, and the layer-by-layer driver.

Text: the GNU General Public License version 3 (Free Software Foundation, 2007), copied
verbatim from Debian's ``/usr/share/common-licenses/GPL-3`` into
``jaxllm/quant/data/gpl-3.0.txt`` (the license allows verbatim copies).  Its first
``CALIBRATION_TOKENS`` tokens calibrate; the rest is held out for evaluation
(:func:`split_tokens`).

Capturing activations without a second copy of the model: the model's own forward
(injected as ``Calibration.forward``, so this package does not import the model code) runs
one layer at a time on the calibration hidden states, fed in as a fake "embedding" whose
rows are those states; each linear weight is wrapped in a :class:`Probe`, which
``llama.matmul`` hands to :func:`jaxllm.quant.ops.matmul`, where it reports its input and
output to the host (``jax.debug.callback``) and returns the float product.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.quant import awq, gptq, smoothquant
from jaxllm.quant.smoothing import GROUPS, check_fused

TEXT_FILE = Path(__file__).resolve().parent / "data" / "gpl-3.0.txt"
TEXT_SOURCE = ("GNU General Public License v3 (FSF, 2007), verbatim copy of Debian's "
               "/usr/share/common-licenses/GPL-3")
CALIBRATION_TOKENS = 2048
SEQ_LEN = 256

# forward(params, tokens [S, T]) -> anything: the decoder's layers on ``params`` (a params
# dict with "embed", "layers" (a list) and "final_norm"), full causal attention per row
ForwardFn = Callable[[dict, jax.Array], Any]


def calibration_text() -> str:
    """The calibration / evaluation text (module docstring)."""
    return TEXT_FILE.read_text(encoding="utf-8")


def split_tokens(tokenizer: Any, n_calib: int = CALIBRATION_TOKENS) -> tuple[list[int], list[int]]:
    """``(calibration tokens, held-out tokens)``: the text's first ``n_calib`` tokens and
    the rest."""
    ids = tokenizer.encode(calibration_text(), add_special_tokens=False)
    if len(ids) < 2 * n_calib:
        raise ValueError(f"calibration text has {len(ids)} tokens, need at least "
                         f"{2 * n_calib} for {n_calib} calibration + as many held out")
    return ids[:n_calib], ids[n_calib:]


@dataclass(frozen=True)
class Calibration:
    """What the calibrated methods need: the model's ``forward`` (see ``ForwardFn``), its
    ``config`` (heads, for GQA), and ``tokens [S, T]`` of calibration text."""
    forward: ForwardFn
    config: Any
    tokens: np.ndarray

    @classmethod
    def from_text(cls, tokenizer: Any, forward: ForwardFn, config: Any,
                  n_tokens: int = CALIBRATION_TOKENS, seq_len: int = SEQ_LEN) -> "Calibration":
        """The first ``n_tokens`` of the calibration text as ``n_tokens // seq_len`` rows."""
        if tokenizer is None:
            raise ValueError("calibrated quantization (awq, gptq, w8a8) needs the model's "
                             "tokenizer to encode the calibration text; this model has none")
        if n_tokens % seq_len:
            raise ValueError(f"n_tokens {n_tokens} must be a multiple of seq_len {seq_len}")
        ids, _ = split_tokens(tokenizer, n_tokens)
        return cls(forward, config, np.asarray(ids, np.int32).reshape(-1, seq_len))

    def quantize_layers(self, params: dict, qc: Any, dtype: Any) -> dict:
        """``params`` with every layer's linears quantized by ``qc.method`` (and their
        scales folded into the float leaves); embedding and LM head untouched."""
        layers = params["layers"]
        stacked = isinstance(layers, dict)
        lps = ([{k: v[i] for k, v in layers.items()} for i in range(len(next(iter(
            layers.values()))))] if stacked else list(layers))
        _preflight(lps, qc)
        runner = LayerRunner(self)
        x = runner.embed(params["embed"])
        out = []
        for lp in lps:
            lpf = {k: np.asarray(v, np.float32) for k, v in lp.items()}
            if qc.method == "gptq":
                new, delta = gptq.quantize_layer(lpf, lambda l: runner.run(l, x), qc.bits,
                                                 qc.group_size, qc.act_order, dtype)
            else:
                acts = runner.run(lpf, x)
                delta = acts["wo"][1] + acts["w_down"][1]
                new = (awq.quantize_layer(lpf, acts, self.config, qc.group_size, dtype)
                       if qc.method == "awq" else
                       smoothquant.quantize_layer(lpf, acts, self.config, qc.alpha, dtype))
            out.append({k: _like(v, lp[k]) for k, v in new.items()})
            x = x + delta.reshape(x.shape)
        return {**params, "layers": _stack(out) if stacked else out}


def _preflight(lps: list[dict], qc: Any) -> None:
    """Every check that can fail, before any calibration work: fused layout, group sizes."""
    for lp in lps:
        check_fused(lp, qc.name)
        if qc.group_size is not None:
            for name in GROUPS:
                k = np.shape(lp[name])[-2]
                if k % qc.group_size:
                    raise ValueError(f"cannot quantize weight {name!r} with {qc.name}: "
                                     f"group_size {qc.group_size} does not divide its "
                                     f"contraction dimension {k}")
        quantized = [k for k in GROUPS if not isinstance(lp[k], (np.ndarray, jax.Array))]
        if quantized:
            raise ValueError(f"quantization {qc.name!r} needs float weights; {quantized} "
                             f"are already quantized")


def _like(new: Any, old: Any) -> Any:
    """Float leaves back in their original dtype; quantized leaves as they are."""
    if isinstance(new, np.ndarray) and hasattr(old, "dtype"):
        return new.astype(old.dtype)
    return new


def _stack(lps: list[dict]) -> dict:
    """List of per-layer dicts -> stacked dict (quantized leaves stacked child by child)."""
    return {k: jax.tree.map(lambda *xs: np.stack([np.asarray(a) for a in xs]),
                            *[lp[k] for lp in lps]) for k in lps[0]}


# --------------------------------------------------------------------------- capture

@jax.tree_util.register_pytree_node_class
class Probe:
    """A float weight that reports its matmul's input and output (calibration only)."""

    def __init__(self, w: Any, name: str) -> None:
        self.w, self.name = w, name

    def tree_flatten(self):
        return (self.w,), self.name

    @classmethod
    def tree_unflatten(cls, name, children):
        return cls(children[0], name)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    @property
    def ndim(self) -> int:
        return len(self.w.shape)

    @property
    def dtype(self) -> Any:
        return self.w.dtype


_RECORDS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _record(name: str, x: Any, y: Any) -> None:
    _RECORDS[name] = (np.array(x, np.float32), np.array(y, np.float32))


def probe_matmul(x: jax.Array, p: Probe, out_dtype: Any = None) -> jax.Array:
    """``x @ p.w`` in float32 (full precision), reporting ``(x, y)`` flattened to rows."""
    x32 = x.astype(jnp.float32)
    y = jnp.matmul(x32, jnp.asarray(p.w, jnp.float32), precision=jax.lax.Precision.HIGHEST)
    jax.debug.callback(functools.partial(_record, p.name),
                       x32.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
    return y.astype(out_dtype or x.dtype)


class LayerRunner:
    """Runs one decoder layer on calibration hidden states through the model's forward
    (jitted once: every layer has the same shapes) and returns each linear's ``(input
    [n, K], output [n, N])`` as float32 NumPy arrays."""

    def __init__(self, calibration: Calibration) -> None:
        self.tokens = calibration.tokens
        s, t = self.tokens.shape
        rows = jnp.arange(s * t, dtype=jnp.int32).reshape(s, t)
        forward = calibration.forward

        def run(lp: dict, x: jax.Array) -> Any:
            d = x.shape[-1]
            p = {"embed": x.reshape(-1, d), "layers": [lp], "final_norm": jnp.ones(d, x.dtype)}
            return forward(p, rows)

        self._run = jax.jit(run)

    def embed(self, embed: Any) -> np.ndarray:
        """Layer 0's input: the embedding rows of the calibration tokens ``[S, T, D]``."""
        return np.asarray(embed[self.tokens], np.float32)

    def run(self, lp: dict, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{name: (x_in, y_out)}`` of the four linears of float layer ``lp`` on ``x``."""
        probed = {k: Probe(v, k) if k in GROUPS else v for k, v in lp.items()}
        _RECORDS.clear()
        jax.block_until_ready(self._run(probed, jnp.asarray(x)))
        jax.effects_barrier()
        missing = [k for k in GROUPS if k not in _RECORDS]
        if missing:
            raise RuntimeError(f"the model's forward did not run the linears {missing} "
                               f"through jaxllm.quant.ops.matmul")
        out = dict(_RECORDS)
        _RECORDS.clear()
        return out
