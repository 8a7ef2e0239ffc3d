"""Traces across the outbox hop: the worker's span for an intent links to the request that accepted
it (and to the one that replayed it), with its S3 and SQL calls beneath it; real PostgreSQL and S3."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from service.core import tracing
from service.core.settings import Settings
from service.dev.embedded import free_port
from tests.support import MakeClient, accepted, intent_row, png, publish_due


@pytest.fixture
def spans(settings: Settings) -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test, every span kept in memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    with tracing.traced(settings, tracing.Role.DEV, exporter=exporter):
        yield exporter


def server_span(exporter: InMemorySpanExporter, method: str) -> ReadableSpan:
    (found,) = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER and s.name.startswith(method)]
    return found


def worker_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == "process intent"]


def descendants(exporter: InMemorySpanExporter, root: ReadableSpan) -> list[ReadableSpan]:
    """Every span below `root` in its trace, at any depth."""
    assert root.context is not None
    below: list[ReadableSpan] = []
    parents = {root.context.span_id}
    for span in sorted(exporter.get_finished_spans(), key=lambda s: s.start_time or 0):
        if span.parent is not None and span.parent.span_id in parents and span.context is not None:
            below.append(span)
            parents.add(span.context.span_id)
    return below


def linked(span: ReadableSpan) -> dict[str, tuple[int, int]]:
    """(trace id, span id) of each link, by the link's profiles.link name."""
    return {
        str((link.attributes or {})["profiles.link"]): (link.context.trace_id, link.context.span_id)
        for link in span.links
    }


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


async def test_the_worker_span_links_to_the_put_that_accepted_the_intent_with_s3_and_sql_beneath_it(
    spans: InMemorySpanExporter, make_client: MakeClient, settings: Settings
) -> None:
    client = await make_client(settings)
    await accepted(client, "tia", {"display_name": "Tia"}, png(1))
    assert await publish_due(settings) == 1

    put = server_span(spans, "PUT")
    (worker,) = worker_spans(spans)
    assert worker.parent is None, "a new trace, not a child of the request that ended at 202"
    assert worker.context is not None and put.context is not None
    assert worker.context.trace_id != put.context.trace_id
    assert linked(worker) == {"accepted": ids(put)}
    assert worker.attributes is not None and worker.attributes["profiles.outcome"] == "done"

    below = descendants(spans, worker)
    assert {"S3.PutObject"} <= {s.name for s in below if s.kind is SpanKind.CLIENT and s.name.startswith("S3.")}
    assert "SQL publish_intents" in {s.name for s in below}
    # The PUT's own transaction is traced under the request span.
    assert "SQL accept_put" in {s.name for s in descendants(spans, put)}
    # The workers' polling starts no trace of its own: every SQL or S3 span has a parent.
    assert all(s.parent is not None for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT)


async def test_a_replayed_intent_keeps_its_link_to_the_put_and_links_the_replay_request_too(
    spans: InMemorySpanExporter, make_client: MakeClient, settings: Settings
) -> None:
    once = settings.model_copy(update={"max_attempts": 1})
    client = await make_client(once)
    body = await accepted(client, "rex", {"display_name": "Rex"}, png(2))
    s3_down = once.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}"})
    assert await publish_due(s3_down) == 1
    assert (await intent_row(settings.database_url, body["intent_id"]))["state"] == "dead"

    response = await client.post(f"/v1/admin/intents/{body['intent_id']}/replay")
    assert (await response.json())["outcome"] == "replayed"
    assert await publish_due(settings) == 1

    put, replay = server_span(spans, "PUT"), server_span(spans, "POST")
    failed, done = sorted(worker_spans(spans), key=lambda s: s.start_time or 0)
    assert linked(failed) == {"accepted": ids(put)}
    assert failed.status.is_ok is False
    assert linked(done) == {"accepted": ids(put), "replayed": ids(replay)}
    assert (await intent_row(settings.database_url, body["intent_id"]))["state"] == "done"


async def test_with_tracing_off_no_span_context_is_stored(make_client: MakeClient, settings: Settings) -> None:
    client = await make_client(settings)
    body = await accepted(client, "ota", {"display_name": "Ota"}, png(3), headers={"traceparent": TRACEPARENT})
    assert (await intent_row(settings.database_url, body["intent_id"]))["traceparent"] is None


TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(
    ("environment", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_tracing_is_on_only_when_an_otlp_endpoint_is_set(environment: dict[str, str], on: bool) -> None:
    assert tracing.wanted(environment) is on


def test_a_malformed_stored_traceparent_gives_no_link() -> None:
    assert tracing.links_to(accepted="00-not-a-trace-01", replayed=None) == []
    assert len(tracing.links_to(accepted=TRACEPARENT)) == 1
