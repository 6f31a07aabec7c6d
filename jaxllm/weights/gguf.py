"""GGUF (llama.cpp) files -> ModelConfig + stacked params pytree + tokenizer.

The header (metadata + tensor directory) is parsed here directly with ``struct``, much
faster than ``gguf.GGUFReader`` for large vocabularies (docs/design.md#measurements).
Tensor payloads are read one at a time, dequantized with ``gguf.quants.dequantize`` and
cast to the target dtype as they are written into the preallocated stacked arrays (peak
memory ~ final params + one f32 tensor).

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` of the ``llama``
architecture for its interleaved ("GPT-J" style) RoPE; we undo that so the weights
follow the HF ``rotate_half`` convention used by ``jaxllm.models`` (same as
``transformers``' GGUF loader).  ``qwen2`` GGUFs are not permuted.

:func:`tokenizer_from_gguf` rebuilds the file's vocabulary as a ``tokenizers`` pipeline
that tokenizes the way llama.cpp does (pre-tokenizer regex chosen by ``tokenizer.ggml.pre``).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from jaxllm.config import ModelConfig, freeze_rope_scaling
from jaxllm.tokenizer import Tokenizer, set_post_processor
from jaxllm.weights._common import (alloc_params, param_shapes, progress_bar, resolve_dtype,
                                    transpose_into)

__all__ = ["GGUFTokenizerInfo", "GGUFFile", "read_gguf", "read_tensor", "config_from_gguf", "load_gguf",
           "tokenizer_from_gguf", "SUPPORTED_GGUF_ARCHITECTURES"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2")

# GGUF metadata value types
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
               10: "Q", 11: "q", 12: "d"}
_NP_DTYPE = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
             6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]      # numpy order (GGUF ne reversed): [rows, cols] for matrices
    qtype: int                  # gguf.GGMLQuantizationType value
    offset: int                 # absolute byte offset in the file
    nbytes: int


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF header; tensor bytes are read lazily from ``path``."""
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    file_size: int


@dataclasses.dataclass(frozen=True)
class GGUFTokenizerInfo:
    """The tokenizer a GGUF file describes (``tokenizer.*`` metadata)."""
    model: str                          # tokenizer.ggml.model: "gpt2" (byte-level BPE), "llama" (SPM) ...
    pre: str | None                     # tokenizer.ggml.pre: pre-tokenizer regex family
    tokens: tuple[str, ...]
    token_type: tuple[int, ...] | None  # 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    merges: tuple[str, ...] | None
    scores: tuple[float, ...] | None
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool | None
    add_eos_token: bool | None
    add_space_prefix: bool | None
    chat_template: str | None

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> "GGUFTokenizerInfo":
        def opt_int(key):
            v = md.get(key)
            return None if v is None else int(v)

        def opt_bool(key):
            v = md.get(key)
            return None if v is None else bool(v)

        tt = md.get("tokenizer.ggml.token_type")
        merges = md.get("tokenizer.ggml.merges")
        scores = md.get("tokenizer.ggml.scores")
        return cls(
            model=str(md.get("tokenizer.ggml.model", "")),
            pre=md.get("tokenizer.ggml.pre"),
            tokens=tuple(md.get("tokenizer.ggml.tokens") or ()),
            token_type=None if tt is None else tuple(int(t) for t in tt),
            merges=None if merges is None else tuple(merges),
            scores=None if scores is None else tuple(float(s) for s in scores),
            bos_token_id=opt_int("tokenizer.ggml.bos_token_id"),
            eos_token_id=opt_int("tokenizer.ggml.eos_token_id"),
            unk_token_id=opt_int("tokenizer.ggml.unknown_token_id"),
            pad_token_id=opt_int("tokenizer.ggml.padding_token_id"),
            add_bos_token=opt_bool("tokenizer.ggml.add_bos_token"),
            add_eos_token=opt_bool("tokenizer.ggml.add_eos_token"),
            add_space_prefix=opt_bool("tokenizer.ggml.add_space_prefix"),
            chat_template=md.get("tokenizer.chat_template"),
        )


# ----------------------------------------------------------------------------- header parsing

class _Buf:
    __slots__ = ("mm", "pos", "path")

    def __init__(self, mm, path):
        self.mm, self.pos, self.path = mm, 0, path

    def need(self, n: int) -> None:
        if self.pos + n > len(self.mm):
            raise ValueError(
                f"{self.path}: truncated GGUF file: header needs {self.pos + n} bytes, "
                f"file has {len(self.mm)}")

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        self.need(size)
        out = struct.unpack_from("<" + fmt, self.mm, self.pos)
        self.pos += size
        return out[0] if len(out) == 1 else out

    def string(self) -> str:
        n = self.unpack("Q")
        self.need(n)
        s = bytes(self.mm[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("I"), self.unpack("Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype in _NP_DTYPE:
                dt = np.dtype(_NP_DTYPE[etype]).newbyteorder("<")
                self.need(count * dt.itemsize)
                arr = np.frombuffer(self.mm, dtype=dt, count=count, offset=self.pos).copy()
                self.pos += count * dt.itemsize
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype in _SCALAR_FMT:
            return self.unpack(_SCALAR_FMT[vtype])
        raise ValueError(f"{self.path}: unknown GGUF metadata value type {vtype} at byte {self.pos}")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the header of a GGUF file (v2/v3, little-endian); validates tensor extents.

    The parsed header is kept for the file as it is on disk (path, size, modification
    time): ``LLM()`` reads it to choose the weights' form and again to load them, and the
    default model's header (its 49k-token vocabulary) takes ~0.2 s to parse.  Callers
    share the returned object and must not modify it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    st = path.stat()
    return _parse_gguf(path, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4)
def _parse_gguf(path: Path, size: int, mtime_ns: int) -> GGUFFile:
    # The gguf package loads on first use: start-up from the params cache never needs it.
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if size < 24:
        raise ValueError(f"{path}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file (magic {bytes(mm[:4])!r}, expected b'GGUF')")
        buf = _Buf(mm, path)
        buf.pos = 4
        version = buf.unpack("I")
        if version not in (2, 3):
            if version & 0xFFFF == 0 and version != 0:
                raise ValueError(f"{path}: big-endian GGUF files are not supported")
            raise ValueError(f"{path}: unsupported GGUF version {version} (expected 2 or 3)")
        n_tensors, n_kv = buf.unpack("QQ")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise ValueError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata keys)")
        md: dict[str, Any] = {}
        for _ in range(n_kv):
            key = buf.string()
            md[key] = buf.value(buf.unpack("I"))
        infos = []
        for _ in range(n_tensors):
            name = buf.string()
            ndim = buf.unpack("I")
            if ndim > 8:
                raise ValueError(f"{path}: corrupt GGUF tensor entry {name!r} ({ndim} dims)")
            ne = [buf.unpack("Q") for _ in range(ndim)]
            qtype, offset = buf.unpack("IQ")
            infos.append((name, ne, qtype, offset))
        alignment = int(md.get("general.alignment", 32))
        data_start = (buf.pos + alignment - 1) // alignment * alignment

    tensors: dict[str, GGUFTensorInfo] = {}
    for name, ne, qtype, offset in infos:
        try:
            qt = GGMLQuantizationType(qtype)
            block, type_size = GGML_QUANT_SIZES[qt]
        except (ValueError, KeyError):
            raise ValueError(f"{path}: tensor {name!r} has unknown GGML type {qtype}") from None
        n = int(np.prod(ne, dtype=np.int64)) if ne else 1
        if ne and ne[0] % block:
            raise ValueError(f"{path}: tensor {name!r} row length {ne[0]} is not a multiple of the "
                             f"{qt.name} block size {block}")
        nbytes = n // block * type_size
        start = data_start + offset
        if start + nbytes > size:
            raise ValueError(
                f"{path}: truncated GGUF file: tensor {name!r} needs bytes {start}..{start + nbytes} "
                f"but the file has {size} bytes")
        tensors[name] = GGUFTensorInfo(name, tuple(reversed(ne)), qtype, start, nbytes)
    return GGUFFile(path, version, md, tensors, size)


# ----------------------------------------------------------------------------- config

def _arch_key(md: Mapping[str, Any], arch: str, key: str, default=None, required=False):
    full = f"{arch}.{key}"
    if full in md:
        return md[full]
    if required:
        raise KeyError(full)
    return default


def config_from_gguf(metadata: Mapping[str, Any], tensor_names: Sequence[str] = (),
                     *, source: str = "<gguf>",
                     tensor_reader: Callable[[str], np.ndarray] | None = None) -> ModelConfig:
    """Build a ModelConfig from GGUF metadata (``llama`` / ``qwen2`` architectures).

    ``tensor_names`` decides tied embeddings (no ``output.weight`` => tied) and q/k/v biases;
    ``tensor_reader`` (name -> f32 array) is used to interpret a ``rope_freqs.weight`` tensor
    (Llama 3.1+ "llama3" rope scaling) if present.
    """
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {list(SUPPORTED_GGUF_ARCHITECTURES)}")
    names = set(tensor_names)
    try:
        hidden = int(_arch_key(metadata, arch, "embedding_length", required=True))
        heads = int(_arch_key(metadata, arch, "attention.head_count", required=True))
        kv = _arch_key(metadata, arch, "attention.head_count_kv", heads)
        if isinstance(kv, list):
            raise ValueError(f"{source}: per-layer head_count_kv is not supported")
        kv = int(kv)
        n_layers = int(_arch_key(metadata, arch, "block_count", required=True))
        ffn = int(_arch_key(metadata, arch, "feed_forward_length", required=True))
    except KeyError as e:
        raise ValueError(f"{source}: GGUF metadata is missing the required key {e.args[0]!r}") from None
    head_dim = int(_arch_key(metadata, arch, "attention.key_length", 0)
                   or _arch_key(metadata, arch, "rope.dimension_count", 0) or hidden // heads)
    vocab = _arch_key(metadata, arch, "vocab_size")
    if vocab is None:
        vocab = len(metadata.get("tokenizer.ggml.tokens") or ())
    if not vocab:
        raise ValueError(f"{source}: cannot tell the vocabulary size (no {arch}.vocab_size, "
                         "no tokenizer.ggml.tokens)")
    ctx = int(_arch_key(metadata, arch, "context_length", 2048))

    scaling = _rope_scaling(metadata, arch, names, tensor_reader, head_dim, ctx, source)
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    name = str(metadata.get("general.name", "")).lower()
    out_arch = arch
    if arch == "llama" and "mistral" in name:
        out_arch = "mistral"
    window = _arch_key(metadata, arch, "attention.sliding_window")
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        rms_norm_eps=float(_arch_key(metadata, arch, "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_arch_key(metadata, arch, "rope.freq_base", 10000.0)),
        rope_scaling=freeze_rope_scaling(scaling),
        max_position_embeddings=ctx,
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        sliding_window=int(window) if window else None,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=() if eos is None else (int(eos),),
        architecture=out_arch,
    )


def _rope_scaling(metadata: Mapping[str, Any], arch: str, names: set[str],
                  tensor_reader: Callable[[str], np.ndarray] | None, head_dim: int, ctx: int,
                  source: str) -> dict | None:
    """HF-style ``rope_scaling`` from ``rope.scaling.*`` keys or a ``rope_freqs`` tensor."""
    stype = _arch_key(metadata, arch, "rope.scaling.type")
    if stype and stype != "none":
        factor = float(_arch_key(metadata, arch, "rope.scaling.factor", 1.0))
        scaling = {"rope_type": stype, "factor": factor}
        orig = _arch_key(metadata, arch, "rope.scaling.original_context_length")
        if orig:
            scaling["original_max_position_embeddings"] = int(orig)
        attn_factor = _arch_key(metadata, arch, "rope.scaling.attn_factor")
        if attn_factor is not None and stype == "yarn":
            scaling["attention_factor"] = float(attn_factor)
        return scaling
    if "rope_freqs.weight" in names:
        theta = float(_arch_key(metadata, arch, "rope.freq_base", 10000.0))
        return _llama3_scaling_from_freqs(tensor_reader, head_dim, theta, ctx, source)
    return None


def _llama3_scaling_from_freqs(reader, head_dim, theta, ctx, source):
    """Recover HF's "llama3" rope_scaling from llama.cpp's ``rope_freqs`` tensor.

    llama.cpp stores the per-frequency divisors; HF stores the parameters that produce
    them.  We try Meta's published parameters (low 1, high 4, original 8192) with the
    factor read off the tensor and insist that they reproduce it.
    """
    if reader is None:
        raise ValueError(f"{source}: has a rope_freqs.weight tensor but no reader to interpret it")
    freqs = np.asarray(reader("rope_freqs.weight"), np.float64).reshape(-1)
    factor = float(freqs.max())
    cand = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv
    low_wl, high_wl = 8192 / 1.0, 8192 / 4.0
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    div = np.where(wavelen > low_wl, factor,
                   np.where(wavelen < high_wl, 1.0, 1.0 / ((1 - smooth) / factor + smooth)))
    if freqs.shape != div.shape or not np.allclose(div, freqs, rtol=1e-3, atol=1e-3):
        raise ValueError(f"{source}: rope_freqs.weight does not match llama3 rope scaling with "
                         f"factor {factor}; this rope scaling is not supported")
    return cand


# ----------------------------------------------------------------------------- tensors

def read_tensor(f, info: GGUFTensorInfo, source: str = "<gguf>") -> np.ndarray:
    """One tensor of an open GGUF file (``f``: binary file object) as float32, numpy (HF)
    orientation, dequantized with ``gguf.quants.dequantize``."""
    # Loaded on first use, as in read_gguf.
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qt = GGMLQuantizationType(info.qtype)
    f.seek(info.offset)
    data = f.read(info.nbytes)
    if len(data) != info.nbytes:
        raise ValueError(f"{source}: truncated GGUF file: tensor {info.name!r} is cut short")
    raw = np.frombuffer(data, dtype=np.uint8)
    if qt == GGMLQuantizationType.F32:
        return raw.view("<f4").reshape(info.shape)
    if qt == GGMLQuantizationType.F64:
        return raw.view("<f8").astype(np.float32).reshape(info.shape)
    block, type_size = GGML_QUANT_SIZES[qt]
    rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
    try:
        out = dequantize(raw.reshape(rows, -1), qt)
    except NotImplementedError:
        raise ValueError(f"{source}: tensor {info.name!r} has quantization type {qt.name}, which "
                         "gguf.quants cannot dequantize") from None
    return np.asarray(out, dtype=np.float32).reshape(info.shape)


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE -> rotate_half).  Rows are axis 0."""
    # llama.cpp: w.reshape(n_head, 2, half, ...).swapaxes(1, 2); this is its inverse.
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_TENSORS = {
    # gguf name: (param key, is matmul weight, permute heads: None | "q" | "k")
    "attn_norm.weight": ("attn_norm", False, None),
    "attn_q.weight": ("wq", True, "q"),
    "attn_k.weight": ("wk", True, "k"),
    "attn_v.weight": ("wv", True, None),
    "attn_q.bias": ("bq", False, "q"),
    "attn_k.bias": ("bk", False, "k"),
    "attn_v.bias": ("bv", False, None),
    "attn_output.weight": ("wo", True, None),
    "ffn_norm.weight": ("mlp_norm", False, None),
    "ffn_gate.weight": ("w_gate", True, None),
    "ffn_up.weight": ("w_up", True, None),
    "ffn_down.weight": ("w_down", True, None),
}


_Job = tuple[str, Callable[[np.ndarray], None], tuple]  # (tensor name, writer, HF-order shape)


def _tensor_jobs(cfg: ModelConfig, shapes: dict, params: dict, permuted_rope: bool) -> list[_Job]:
    """One job per GGUF tensor: its name, a function writing it into ``params``, its shape."""
    def put_top(key, transpose):
        def fn(w):
            if transpose:
                transpose_into(params[key], w)
            else:
                params[key][...] = w
        return fn

    jobs: list[_Job] = [("token_embd.weight", put_top("embed", False), shapes["embed"]),
                        ("output_norm.weight", put_top("final_norm", False), shapes["final_norm"])]
    if not cfg.tie_word_embeddings:
        jobs.append(("output.weight", put_top("lm_head", True), shapes["lm_head"][::-1]))
    for i in range(cfg.num_layers):
        for suffix, (key, is_mat, perm) in _LAYER_TENSORS.items():
            if key not in shapes["layers"]:
                continue
            full = shapes["layers"][key][1:]
            hf_shape = full[::-1] if is_mat else full

            def fn(w, key=key, i=i, is_mat=is_mat, perm=perm):
                if perm and permuted_rope:
                    w = _unpermute_rope(w, cfg.num_heads if perm == "q" else cfg.num_kv_heads)
                if is_mat:
                    transpose_into(params["layers"][key][i], w)
                else:
                    params["layers"][key][i] = w
            jobs.append((f"blk.{i}.{suffix}", fn, hf_shape))
    return jobs


def _check_tensor_names(gf: GGUFFile, wanted: list[str], arch: str, src: str) -> None:
    """Every tensor the model needs is in the file, and the file has nothing else."""
    missing = [name for name in wanted if name not in gf.tensors]
    if missing:
        raise ValueError(f"{src}: GGUF file lacks tensors expected for a {arch} model: "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unknown = sorted({n.split(".", 2)[-1] if n.startswith("blk.") else n for n in gf.tensors}
                     - {"token_embd.weight", "output_norm.weight", "output.weight",
                        "rope_freqs.weight"} - set(_LAYER_TENSORS))
    if unknown:
        raise ValueError(f"{src}: GGUF file has tensors this loader does not understand: {unknown}")


def load_gguf(path: str | os.PathLike, dtype=np.float32, *, progress: bool | None = None,
              ) -> tuple[ModelConfig, dict, GGUFTokenizerInfo]:
    """Load a llama/qwen2 GGUF file into ``(config, params, tokenizer_info)``.

    Params follow docs/design.md (numpy, ``[in, out]`` matmuls, layers stacked on axis 0)
    and are cast to ``dtype`` tensor by tensor.  Raises ``FileNotFoundError`` for a missing
    file and ``ValueError`` (naming the file) for a corrupt/truncated file, an unsupported
    architecture or quantization type, or missing/misshapen tensors.
    """
    dtype = resolve_dtype(dtype)
    path = Path(path)
    gf = read_gguf(path)
    src = str(path)
    md = gf.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"{src}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {list(SUPPORTED_GGUF_ARCHITECTURES)}")
    with open(path, "rb") as f:
        def read(name):
            return read_tensor(f, gf.tensors[name], src)

        cfg = config_from_gguf(md, gf.tensors.keys(), source=src, tensor_reader=read)
        shapes = param_shapes(cfg)
        params = alloc_params(shapes, dtype)
        jobs = _tensor_jobs(cfg, shapes, params, permuted_rope=arch == "llama")
        _check_tensor_names(gf, [name for name, _, _ in jobs], arch, src)
        total = sum(gf.tensors[n].nbytes for n, _, _ in jobs)
        with progress_bar(total, f"Loading {path.name}", enabled=progress,
                          large=gf.file_size > 200 * 2**20) as bar:
            for name, fn, want in jobs:
                info = gf.tensors[name]
                if tuple(info.shape) != tuple(want):
                    raise ValueError(f"{src}: tensor {name!r} has shape {info.shape} "
                                     f"(numpy order), expected {tuple(want)}")
                fn(read(name))
                bar.update(info.nbytes)
    return cfg, params, GGUFTokenizerInfo.from_metadata(md)


# ----------------------------------------------------------------------------- tokenizer

# llama.cpp pre-tokenizer regexes, by `tokenizer.ggml.pre` (llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx",
                     "smaug-bpe", "lfm2"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O_SPLIT),
}
# GPT-2 regex after splitting every digit on its own (starcoder family, SmolLM).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (as in ``transformers``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_from_gguf(info: GGUFTokenizerInfo | str | os.PathLike) -> Tokenizer:
    """A :class:`~jaxllm.tokenizer.Tokenizer` from GGUF tokenizer metadata (or a ``.gguf`` path).

    ``gpt2`` (byte-level BPE) and ``llama`` (SentencePiece BPE) vocabularies are rebuilt as
    ``tokenizers`` pipelines that tokenize the way llama.cpp does.
    """
    if isinstance(info, (str, os.PathLike)):
        info = GGUFTokenizerInfo.from_metadata(read_gguf(info).metadata)
    tokens = list(info.tokens)
    if not tokens:
        raise ValueError("GGUF file has no tokenizer.ggml.tokens")

    def tok(i):
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    if info.model == "gpt2":
        backend = _gguf_byte_level(info)
        add_bos = bool(info.add_bos_token)
    elif info.model == "llama":
        backend = _gguf_sentencepiece(info)
        add_bos = True if info.add_bos_token is None else bool(info.add_bos_token)
    else:
        raise ValueError(f"GGUF tokenizer model {info.model!r} is not supported "
                         "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")
    _add_gguf_special_tokens(backend, info)
    set_post_processor(backend, tok(info.bos_token_id) if add_bos else None,
                       tok(info.eos_token_id) if info.add_eos_token else None)
    return Tokenizer(backend, chat_template=info.chat_template, bos_token=tok(info.bos_token_id),
                     eos_token=tok(info.eos_token_id), unk_token=tok(info.unk_token_id),
                     pad_token=tok(info.pad_token_id), source="gguf")


def _gguf_byte_level(info: GGUFTokenizerInfo) -> Backend:
    """Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM) with llama.cpp's pre-tokenizer regex."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(info.tokens):
        # llama.cpp writes a few control tokens in plain UTF-8; respell them like HF does.
        key = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
        vocab[key] = i
    # No merges (some synthetic/test files): every token is then matched whole or not at all.
    merges = [tuple(m.split(" ", 1)) for m in (info.merges or ())]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False))
    pre = info.pre or "default"
    if pre in _PRE_SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRE_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in _DIGITS_THEN_GPT2:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:  # "gpt2", "default", and unknown families: GPT-2's own regex
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _gguf_sentencepiece(info: GGUFTokenizerInfo) -> Backend:
    """SentencePiece BPE (Llama 2, Mistral v0.1, TinyLlama ...) as ``tokenizers`` rebuilds it."""
    tokens = list(info.tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if info.merges:
        merges = [tuple(m.split(" ", 1)) for m in info.merges]
    else:
        scores = info.scores or tuple(-float(i) for i in range(len(tokens)))
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk = tokens[info.unk_token_id] if info.unk_token_id is not None else None
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                  byte_fallback=True, dropout=None))
    prefix = True if info.add_space_prefix is None else bool(info.add_space_prefix)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
    seq = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        seq.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(seq)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece vocab + scores -> BPE merges (best score first), as HF derives them."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _add_gguf_special_tokens(backend: Backend, info: GGUFTokenizerInfo) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens."""
    types = info.token_type or ()
    byte_level = info.model == "gpt2"
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(info.tokens, types)
               if ty == 3 and (alphabet is None or set(t) <= alphabet)]  # 3 = CONTROL
    if control:
        backend.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(info.tokens, types) if ty == 4]  # 4 = USER_DEFINED
    if user:
        backend.add_tokens(user)
