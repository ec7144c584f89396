"""factory_boy factories for conversation rows whose timestamps a test wants to control."""

from __future__ import annotations

from datetime import timedelta

import factory
from django.utils import timezone

from conversations.models import Agent, ChatSession, EndUser, Message, Thread


class AgentFactory(factory.django.DjangoModelFactory):
    """The default agent unless a test names another."""

    class Meta:
        model = Agent
        django_get_or_create = ("name",)

    name = "agentflow"


class EndUserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = EndUser
        django_get_or_create = ("agent", "external_id")

    agent = factory.SubFactory(AgentFactory)
    external_id = factory.Sequence(lambda n: f"user-{n}")


class ChatSessionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ChatSession

    user = factory.SubFactory(EndUserFactory)
    ttl_seconds = 3600
    last_activity_at = factory.LazyFunction(timezone.now)
    expires_at = factory.LazyAttribute(lambda o: o.last_activity_at + timedelta(seconds=o.ttl_seconds))


class ThreadFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Thread

    session = factory.SubFactory(ChatSessionFactory)
    user = factory.SelfAttribute("session.user")
    topic = factory.Sequence(lambda n: f"topic {n}")
    last_activity_at = factory.LazyFunction(timezone.now)


class MessageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Message

    thread = factory.SubFactory(ThreadFactory)
    session = factory.SelfAttribute("thread.session")
    user = factory.SelfAttribute("thread.user")
    role = Message.Role.USER
    content = factory.Sequence(lambda n: f"message {n}")
    status = Message.Status.DONE


def default_agent_row() -> Agent:
    """The default agent's record (the one agents built without a config name register as)."""
    return Agent.objects.get_or_create(name="agentflow")[0]
