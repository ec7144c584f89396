"""Few-shot intent classification on sentence embeddings.

Each category is represented by the embeddings of its examples and of its description. A message
scores against a category by its best cosine similarity to those; confidence is a softmax over
the categories' scores, scaled down when even the best match is weak, so that an unrelated message
gets low confidence (and ``intent=None`` below ``out_of_scope_similarity``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agentflow.embeddings import Embedder
from agentflow.types import Classification, IntentCategory, IntentScore

TEMPERATURE = 0.05
OUT_OF_SCOPE_SIMILARITY = 0.20
FULL_CONFIDENCE_SIMILARITY = 0.55


@dataclass(frozen=True)
class IntentClassifier:
    categories: tuple[IntentCategory, ...]
    vectors: np.ndarray  # (n_examples, dim)
    owners: np.ndarray  # (n_examples,) index of the category each vector belongs to

    @classmethod
    def build(cls, categories: Sequence[IntentCategory], embedder: Embedder) -> IntentClassifier:
        texts: list[str] = []
        owners: list[int] = []
        for index, category in enumerate(categories):
            phrases = list(category.examples)
            if category.description:
                phrases.append(category.description)
            if not phrases:
                phrases.append(category.name.replace("_", " ").lower())
            texts.extend(phrases)
            owners.extend([index] * len(phrases))
        vectors = embedder.embed(texts) if texts else np.zeros((0, embedder.dimensions), dtype=np.float32)
        return cls(tuple(categories), vectors, np.array(owners, dtype=np.int64))

    def classify(self, embedding: np.ndarray, *, runners_up: int = 3) -> Classification:
        if not self.categories:
            return Classification(None, 0.0, ())
        sims = self.vectors @ embedding
        scores = np.full(len(self.categories), -1.0, dtype=np.float32)
        np.maximum.at(scores, self.owners, sims)
        exp = np.exp((scores - scores.max()) / TEMPERATURE)
        probs = exp / exp.sum()
        strength = float(np.clip((scores.max() - OUT_OF_SCOPE_SIMILARITY)
                                 / (FULL_CONFIDENCE_SIMILARITY - OUT_OF_SCOPE_SIMILARITY), 0.0, 1.0))
        confidences = probs * strength
        order = np.argsort(-confidences)
        ranked = tuple(
            IntentScore(self.categories[i].name, round(float(confidences[i]), 4)) for i in order[: runners_up + 1]
        )
        best = ranked[0]
        if float(scores.max()) < OUT_OF_SCOPE_SIMILARITY:
            # Out of scope: no category fits, so the confidence is the (near-zero) best category's.
            return Classification(None, best.confidence, ranked[:runners_up])
        return Classification(best.name, best.confidence, ranked[1 : runners_up + 1])
