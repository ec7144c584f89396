"""The few-shot intent classifier on real embeddings, and the sync of code-defined categories."""

from __future__ import annotations

import numpy as np
import pytest

from agentflow.embeddings import get_embedder
from agentflow.types import Classification
from agentflow.types import IntentCategory as Spec
from intents.classifier import IntentClassifier
from intents.models import IntentCategory
from intents.selectors import intent_categories_active
from intents.services import intent_categories_sync
from tests.conversations.factories import default_agent_row

SUPPORT = [
    Spec(
        "QUERY",
        "General questions about using the product",
        ["How do I reset my password?", "What is the API rate limit?", "How do I invite a teammate?"],
    ),
    Spec(
        "OUTAGE",
        "Production issues: something is down or erroring",
        ["Service is down", "Error 500 on every request", "The dashboard won't load"],
    ),
    Spec(
        "BILLING",
        "Invoices, payments and plans",
        ["Where can I find my invoices?", "I was charged twice", "How do I upgrade my plan?"],
    ),
]
PERSONAL = [
    Spec("SCHEDULE", "Calendar management", ["Schedule meeting", "Free time"]),
    Spec("EMAIL", "Email tasks", ["Send email", "Check inbox"]),
    Spec("TASKS", "Task management", ["Add to todo", "My tasks"]),
]


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


@pytest.fixture(scope="module")
def support(embedder):
    return IntentClassifier.build(SUPPORT, embedder)


def classify(classifier: IntentClassifier, embedder, text: str) -> Classification:
    return classifier.classify(embedder.embed_one(text))


@pytest.mark.parametrize(
    ("text", "intent"),
    [
        ("I can't log in, how can I change my password?", "QUERY"),
        ("How can I add a colleague to my workspace?", "QUERY"),
        ("The website returns an internal server error", "OUTAGE"),
        ("Your service is not responding at all", "OUTAGE"),
        ("My card was billed two times this month", "BILLING"),
        ("Can I download last month's invoice?", "BILLING"),
    ],
)
def test_paraphrases_find_their_category(support, embedder, text, intent):
    result = classify(support, embedder, text)

    assert result.intent == intent
    assert result.confidence > max(s.confidence for s in result.runners_up)


@pytest.mark.parametrize(
    ("text", "intent"),
    [
        ("Set up a call with Bob tomorrow at 3pm", "SCHEDULE"),
        ("When am I free on Friday?", "SCHEDULE"),
        ("Write an email to Alice about the budget", "EMAIL"),
        ("Put buy milk on my to-do list", "TASKS"),
    ],
)
def test_seed_personal_assistant_paraphrases(embedder, text, intent):
    result = classify(IntentClassifier.build(PERSONAL, embedder), embedder, text)

    assert result.intent == intent


@pytest.mark.parametrize(
    "text", ["purple elephants dance on the moon", "Photosynthesis converts light into sugar"]
)
def test_out_of_scope_text_has_no_intent_and_low_confidence(support, embedder, text):
    result = classify(support, embedder, text)

    assert result.intent is None
    assert result.confidence < 0.1
    # All categories are listed as (unlikely) candidates.
    assert sorted(s.name for s in result.runners_up) == ["BILLING", "OUTAGE", "QUERY"]
    assert all(s.confidence < 0.1 for s in result.runners_up)


def test_exact_example_gets_high_confidence(support, embedder):
    result = classify(support, embedder, "Error 500 on every request")

    assert result.intent == "OUTAGE"
    assert result.confidence > 0.9


def test_confidences_are_probabilities_and_runners_up_are_ordered(support, embedder):
    for text in ["My invoice shows the wrong amount and the dashboard is down", "hello", "How do I pay?"]:
        result = classify(support, embedder, text)
        scores = [result.confidence, *(s.confidence for s in result.runners_up)]
        assert all(0.0 <= s <= 1.0 for s in scores)
        assert sum(scores) <= 1.0 + 1e-3
        assert [s.confidence for s in result.runners_up] == sorted(
            (s.confidence for s in result.runners_up), reverse=True
        )
        assert result.intent not in {s.name for s in result.runners_up}


def test_runners_up_limit(embedder):
    many = [
        Spec(f"TOPIC_{i}", f"Questions about topic number {i}", [f"topic {i} question"]) for i in range(6)
    ]
    classifier = IntentClassifier.build(many, embedder)

    result = classifier.classify(embedder.embed_one("topic 4 question"), runners_up=2)

    assert result.intent == "TOPIC_4"
    assert len(result.runners_up) == 2


def test_no_categories(embedder):
    classifier = IntentClassifier.build([], embedder)

    assert classifier.classify(embedder.embed_one("anything")) == Classification(None, 0.0, ())


def test_category_without_examples_uses_its_description_or_name(embedder):
    classifier = IntentClassifier.build(
        [Spec("WEATHER_FORECAST"), Spec("RECIPES", "Cooking recipes and ingredients")], embedder
    )

    assert (
        classify(classifier, embedder, "Will it rain tomorrow? weather forecast").intent == "WEATHER_FORECAST"
    )
    assert classify(classifier, embedder, "How long do I bake a chocolate cake?").intent == "RECIPES"
    # Phrases: the name in words for both, plus RECIPES' description.
    assert classifier.vectors.shape == (3, 384)
    np.testing.assert_array_equal(classifier.owners, [0, 1, 1])


# --- intent_categories_sync ------------------------------------------------------------------


@pytest.mark.django_db
def test_sync_creates_code_categories():
    created = intent_categories_sync(
        agent=default_agent_row(),
        categories=[
            Spec("QUERY", "General questions", ["How do I...?"], threshold=0.4, system_prompt="Be brief."),
            Spec("ESCALATION", "Urgent", ["Critical"], threshold=0.0, handoff=True),
        ],
    )

    assert created == 2
    query = IntentCategory.objects.get(name="QUERY")
    assert (query.description, query.examples, query.threshold, query.system_prompt) == (
        "General questions",
        ["How do I...?"],
        0.4,
        "Be brief.",
    )
    assert query.source == IntentCategory.Source.CODE and query.active is True and query.handoff is False
    escalation = IntentCategory.objects.get(name="ESCALATION")
    assert (escalation.threshold, escalation.handoff) == (0.0, True)


@pytest.mark.django_db
def test_sync_updates_code_fields_and_keeps_the_fields_staff_edited(caplog):
    intent_categories_sync(
        agent=default_agent_row(),
        categories=[Spec("QUERY", "General questions", ["How do I...?"], threshold=0.4)],
    )
    # Staff changed these in the admin (the admin records which fields it saved).
    IntentCategory.objects.filter(name="QUERY").update(
        threshold=0.65,
        handoff=True,
        active=False,
        system_prompt="Staff prompt",
        staff_edited=["active", "handoff", "system_prompt", "threshold"],
    )

    with caplog.at_level("WARNING", logger="agentflow.intents"):
        created = intent_categories_sync(
            agent=default_agent_row(),
            categories=[
                Spec(
                    "QUERY",
                    "Questions about the product",
                    ["How do I...?", "What is...?"],
                    threshold=0.1,
                    system_prompt="Code prompt",
                ),
                Spec("OUTAGE", "Production issues", ["Service is down"]),
            ],
        )

    assert created == 1
    query = IntentCategory.objects.get(name="QUERY")
    assert query.description == "Questions about the product"
    assert query.examples == ["How do I...?", "What is...?"]
    assert (query.threshold, query.handoff, query.active, query.system_prompt) == (
        0.65,
        True,
        False,
        "Staff prompt",
    )
    assert IntentCategory.objects.count() == 2
    warnings = sorted(r.getMessage() for r in caplog.records)
    assert len(warnings) == 3
    assert warnings[2] == (
        "agent agentflow, intent QUERY: code sets threshold = 0.1 but staff set 0.65 in the admin; "
        "the staff value wins (the admin action 'Let code set these categories' fields again' hands it back to code)"
    )


@pytest.mark.django_db
def test_sync_sets_code_fields_staff_never_edited():
    intent_categories_sync(
        agent=default_agent_row(),
        categories=[Spec("QUERY", "General questions", ["How do I...?"], threshold=0.4)],
    )

    intent_categories_sync(
        agent=default_agent_row(),
        categories=[Spec("QUERY", "General questions", ["How do I...?"], threshold=0.7, handoff=True)],
    )

    query = IntentCategory.objects.get(name="QUERY")
    assert (query.threshold, query.handoff, query.staff_edited) == (0.7, True, [])


@pytest.mark.django_db
def test_sync_without_changes_does_not_touch_rows():
    specs = [Spec("QUERY", "General questions", ["How do I...?"])]
    intent_categories_sync(agent=default_agent_row(), categories=specs)
    before = IntentCategory.objects.get(name="QUERY").updated_at

    assert intent_categories_sync(agent=default_agent_row(), categories=specs) == 0

    assert IntentCategory.objects.get(name="QUERY").updated_at == before


@pytest.mark.django_db
def test_active_categories_for_agents_built_from_the_admin():
    IntentCategory.objects.create(
        agent=default_agent_row(),
        name="ZETA",
        description="z",
        examples=["z"],
        threshold=0.3,
        handoff=True,
        system_prompt="p",
    )
    IntentCategory.objects.create(
        agent=default_agent_row(), name="ALPHA", description="a", examples=["a", "b"]
    )
    IntentCategory.objects.create(
        agent=default_agent_row(), name="OFF", description="o", examples=["o"], active=False
    )

    specs = intent_categories_active(agent_id=default_agent_row().pk)

    assert [s.name for s in specs] == ["ALPHA", "ZETA"]
    assert specs[0] == Spec("ALPHA", "a", ["a", "b"])
    assert (specs[1].threshold, specs[1].handoff, specs[1].system_prompt) == (0.3, True, "p")
