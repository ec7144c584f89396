"""The default MiniLM's quantized graph: built once into a cache folder, reused, rebuilt, or given up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agentflow.embeddings import EMBEDDERS, MiniLMEmbedder, MiniLMFp32Embedder, resolve_embedder
from agentflow.embeddings.quantized import RECIPE, cache_name, quantized_session

ROOT = Path(__file__).resolve().parents[2]

# Not the check sentences the build uses (agentflow.embeddings.quantized.CHECK_SENTENCES).
SENTENCES = [
    "My login is broken since the update",
    "Where is my order? It was due on Monday.",
    "I was charged twice for the same coffee this morning",
    "Could you recommend a quiet hotel near the station in Lyon?",
    "What's the weather going to be like at the weekend",
    "The app keeps crashing when I open my statements, I've reinstalled it twice already.",
]
# A few words drift more (dynamic quantization scales a short turn's activations by its few tokens):
# over 1,068 bench texts the lowest cosine was 0.93, for "ok thanks" (docs/operations.md).
SHORT = ["Thanks, that fixed it!", "ok thanks", "hi"]


@pytest.fixture(scope="module")
def fp32() -> MiniLMFp32Embedder:
    return MiniLMFp32Embedder()


def cached_graphs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.onnx"))


def test_the_quantized_graph_is_built_once_then_reused(tmp_path: Path, fp32: MiniLMFp32Embedder) -> None:
    first = MiniLMEmbedder(cache_dir=tmp_path)

    (graph,) = cached_graphs(tmp_path)
    assert first.graph == "int8-dynamic"
    assert graph.name == cache_name(fp32.model_path()) and RECIPE in graph.name
    assert os.stat(graph).st_mode & 0o777 == 0o644
    built = os.stat(graph)

    second = MiniLMEmbedder(cache_dir=tmp_path)

    assert second.graph == "int8-dynamic"
    assert cached_graphs(tmp_path) == [graph]
    assert (os.stat(graph).st_ino, os.stat(graph).st_mtime_ns) == (built.st_ino, built.st_mtime_ns)
    assert sorted(p.name for p in tmp_path.iterdir()) == [graph.name]  # no temporary file left
    assert np.array_equal(first.embed(SENTENCES), second.embed(SENTENCES))


def test_quantized_vectors_stay_close_to_the_fp32_graph(tmp_path: Path, fp32: MiniLMFp32Embedder) -> None:
    quantized = MiniLMEmbedder(cache_dir=tmp_path)

    a, b = quantized.embed(SENTENCES), fp32.embed(SENTENCES)

    assert (quantized.graph, fp32.graph) == ("int8-dynamic", "fp32")
    assert a.shape == (len(SENTENCES), 384) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.min(np.sum(a * b, axis=1)) >= 0.98
    assert np.min(np.sum(quantized.embed(SHORT) * fp32.embed(SHORT), axis=1)) >= 0.9
    # Same model id: memories written by either graph stay searchable without re-embedding.
    assert quantized.model_id == fp32.model_id == "all-MiniLM-L6-v2-onnx-int8"


def masked_mean_reference(embedder: MiniLMEmbedder, text: str) -> np.ndarray:
    """The vector as the batch path defines it: the graph's token outputs, mean-pooled under the
    tokenizer's attention mask, L2-normalised (sentence-transformers' pooling)."""
    (encoding,) = embedder._tokenizer.encode_batch([text])
    ids = np.array([encoding.ids], dtype=np.int64)
    mask = np.array([encoding.attention_mask], dtype=np.int64)
    (hidden,) = embedder._session.run([embedder.output_name], embedder.inputs(ids, mask))
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    return (pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)).astype(np.float32)


def test_one_text_gets_the_masked_mean_of_its_tokens_bit_for_bit(
    tmp_path: Path, fp32: MiniLMFp32Embedder
) -> None:
    # A turn embeds one text at a time through a shorter path (no padding, so no mask weighting);
    # it must give the same bits as the batch path's pooling, or cached and stored vectors would
    # differ from a recomputation. Empty, truncated (past 256 tokens) and non-ASCII texts included.
    texts = [*SENTENCES, *SHORT, "", "word " * 400, "Ünïcödé ☃ 東京 café"]
    quantized = MiniLMEmbedder(cache_dir=tmp_path)

    for embedder in (quantized, fp32):
        for text in texts:
            vector = embedder.embed([text])
            assert vector.dtype == np.float32 and vector.shape == (1, 384)
            assert np.array_equal(vector, masked_mean_reference(embedder, text)), (embedder.graph, text)
            assert np.array_equal(embedder.embed_one(text), vector[0])


def test_an_unreadable_cached_graph_is_built_again(tmp_path: Path, fp32: MiniLMFp32Embedder) -> None:
    MiniLMEmbedder(cache_dir=tmp_path)
    (graph,) = cached_graphs(tmp_path)
    size = graph.stat().st_size
    graph.write_bytes(graph.read_bytes()[: size // 3])  # a truncated file, as a full disk might leave

    rebuilt = MiniLMEmbedder(cache_dir=tmp_path)

    assert rebuilt.graph == "int8-dynamic"
    assert cached_graphs(tmp_path) == [graph] and graph.stat().st_size == size
    assert np.min(np.sum(rebuilt.embed(SENTENCES) * fp32.embed(SENTENCES), axis=1)) >= 0.98


def test_a_cache_folder_that_cannot_be_created_falls_back_to_the_fp32_graph(
    tmp_path: Path, fp32: MiniLMFp32Embedder, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    embedder = MiniLMEmbedder(cache_dir=blocker / "cache")

    assert embedder.graph == "fp32"
    assert np.array_equal(embedder.embed(SENTENCES), fp32.embed(SENTENCES))
    assert "no quantized graph" in caplog.text and str(blocker / "cache") in caplog.text


def test_a_drifting_quantized_graph_is_rejected_and_the_verdict_kept(
    tmp_path: Path, fp32: MiniLMFp32Embedder
) -> None:
    opened: list[str] = []

    def open_session(path: str) -> str:
        opened.append(path)
        return path

    source = fp32.model_path()

    assert (
        quantized_session(source, open_session=open_session, fidelity=lambda _: 0.5, directory=tmp_path)
        is None
    )
    assert cached_graphs(tmp_path) == []
    (marker,) = tmp_path.glob("*.rejected")
    assert marker.read_text() == "lowest cosine 0.5000 on the check sentences\n"
    assert len(opened) == 1

    # The next start keeps the source graph without building the copy again.
    assert (
        quantized_session(source, open_session=open_session, fidelity=lambda _: 1.0, directory=tmp_path)
        is None
    )
    assert len(opened) == 1 and cached_graphs(tmp_path) == []


CHILD = """
import json, logging, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
if {block_onnx!r}:
    sys.modules["onnx"] = None  # as if the package were not installed
logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
from agentflow.embeddings import MiniLMEmbedder
start = {start!r}
while time.time() < start:
    time.sleep(0.005)
embedder = MiniLMEmbedder(cache_dir=Path({cache!r}))
print(json.dumps({{"graph": embedder.graph, "vector": embedder.embed_one("Where is my order?").tolist()}}))
"""


def run_children(cache: Path, *, count: int, block_onnx: bool = False) -> list[tuple[dict, str]]:
    start = time.time() + 3.0  # after every child has imported onnxruntime
    code = CHILD.format(root=str(ROOT), block_onnx=block_onnx, start=start, cache=str(cache))
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        for _ in range(count)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        results.append((json.loads(out.strip().splitlines()[-1]), err))
    return results


def test_processes_starting_together_share_one_complete_cached_graph(tmp_path: Path) -> None:
    results = run_children(tmp_path, count=2)

    assert [r["graph"] for r, _ in results] == ["int8-dynamic", "int8-dynamic"]
    assert np.array_equal(np.array(results[0][0]["vector"]), np.array(results[1][0]["vector"]))
    (graph,) = cached_graphs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [graph.name]  # no temporary file left
    (later,) = run_children(tmp_path, count=1)
    assert later[0]["graph"] == "int8-dynamic" and later[0]["vector"] == results[0][0]["vector"]


def test_without_onnx_the_fp32_graph_runs_and_the_log_says_why(
    tmp_path: Path, fp32: MiniLMFp32Embedder
) -> None:
    ((result, stderr),) = run_children(tmp_path, count=1, block_onnx=True)

    assert result["graph"] == "fp32"
    assert np.allclose(np.array(result["vector"]), fp32.embed_one("Where is my order?"), atol=1e-6)
    assert "agentflow.embeddings embedder: cannot quantize" in stderr and "pip install onnx" in stderr
    assert cached_graphs(tmp_path) == []
    assert [p.name for p in tmp_path.iterdir()] == []


def test_minilm_fp32_is_a_name_for_the_shipped_graph() -> None:
    assert resolve_embedder("minilm-fp32") == "agentflow.embeddings.MiniLMFp32Embedder"
    assert EMBEDDERS["minilm"] == "agentflow.embeddings.MiniLMEmbedder"
