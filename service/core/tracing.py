"""OpenTelemetry traces of the API and the workers, off unless an OTLP endpoint is configured; span
contexts cross the outbox as W3C traceparent text, stored with the intent and linked by its worker."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from enum import StrEnum

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.aiohttp_server import AioHttpServerInstrumentor
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import sampling as sdk_sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from service.core.queries import NAMED
from service.core.settings import Settings

# Either switches tracing on (the SDK reads the rest of the OTEL_* variables itself).
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
TRACER_NAME = "profiles"
# Probes and scrapes, every few seconds from every pod: no trace of their own.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
_PROPAGATOR = TraceContextTextMapPropagator()


class Role(StrEnum):
    """Which process the spans come from (the default service.name is profiles-<role>)."""

    API = "api"
    WORKER = "worker"
    DEV = "dev"


class _Installed:
    """What `traced` installed in this process: the tracer of our own spans."""

    tracer: trace.Tracer = trace.NoOpTracer()


def tracer() -> trace.Tracer:
    return _Installed.tracer


def wanted(environ: Mapping[str, str]) -> bool:
    """On when an OTLP endpoint is set, unless OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


class QuietSampler(Sampler):
    """A database or S3 call outside any request or intent starts no trace (the workers' polling and
    maintenance would otherwise start one a second), nor does a probe or a scrape (QUIET_ROUTES);
    everything else is sampled by `delegate`, the sampler OTEL_TRACES_SAMPLER names (default:
    parent-based, always on)."""

    def __init__(self, delegate: Sampler) -> None:
        self._delegate = delegate

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if kind is SpanKind.CLIENT and not parent.is_valid:
            return SamplingResult(Decision.DROP)
        if kind is SpanKind.SERVER and (attributes or {}).get("http.route") in QUIET_ROUTES:
            return SamplingResult(Decision.DROP)
        return self._delegate.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"QuietSampler{{{self._delegate.get_description()}}}"


class QueryNames(SpanProcessor):
    """Database spans are named after the named query they run ("SQL claim_intents"), where the
    asyncpg instrumentation would name them by the first word of its text (a comment's "--")."""

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        attributes = span.attributes or {}
        statement = attributes.get("db.statement", attributes.get("db.query.text"))
        if isinstance(statement, str) and (named := NAMED.match(statement)):
            span.update_name(f"SQL {named[1]}")

    def on_end(self, span: ReadableSpan) -> None:
        pass


def _resource(settings: Settings, role: Role) -> Resource:
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override these defaults.
    defaults = {
        "service.name": f"profiles-{role}",
        "service.namespace": "profiles",
        "deployment.environment.name": settings.mode,
    }
    return Resource.create({**defaults, **OTELResourceDetector().detect().attributes})


@contextlib.contextmanager
def traced(settings: Settings, role: Role, *, exporter: SpanExporter | None = None) -> Iterator[TracerProvider | None]:
    """Traces for the block: to the OTLP/HTTP endpoint when `wanted(os.environ)`, or to `exporter`
    (span by span, for tests); otherwise nothing is installed and nothing costs anything."""
    if exporter is None and not wanted(os.environ):
        yield None
        return
    # The SDK's own reading of OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG.
    provider = TracerProvider(
        resource=_resource(settings, role), sampler=QuietSampler(sdk_sampling._get_from_env_or_default())
    )
    provider.add_span_processor(QueryNames())
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter()) if exporter is None else SimpleSpanProcessor(exporter)
    )
    # The server instrumentation puts its middleware first in every web.Application made meanwhile.
    instrumentors = (AioHttpServerInstrumentor(), AsyncPGInstrumentor())  # type: ignore[no-untyped-call]
    for instrumentor in instrumentors:
        instrumentor.instrument(tracer_provider=provider)
    _Installed.tracer = provider.get_tracer(TRACER_NAME)
    try:
        yield provider
    finally:
        _Installed.tracer = trace.NoOpTracer()
        for instrumentor in instrumentors:
            instrumentor.uninstrument()
        provider.shutdown()


def current_traceparent() -> str | None:
    """The current span's context as W3C traceparent text, or None outside a traced span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def links_to(**traceparents: str | None) -> list[Link]:
    """Span links to the given traceparents (None and malformed ones are left out), each with a
    `profiles.link` attribute naming it."""
    links = []
    for name, traceparent in traceparents.items():
        if traceparent is None:
            continue
        context = trace.get_current_span(_PROPAGATOR.extract({"traceparent": traceparent})).get_span_context()
        if context.is_valid:
            links.append(Link(context, {"profiles.link": name}))
    return links
