"""The one place handwritten code meets generated code.

Everything else imports the protobuf modules as ``pb``/``pb_grpc`` (the
registry) and ``cpu_pb``/``cpu_pb_grpc`` (the cpu service) from here, and turns
the registry's messages into model objects (and back) with these functions.
"""

from __future__ import annotations

from geryon.model import Event, EventType, Revision, Service
from geryon.v1 import cpu_pb2 as cpu_pb
from geryon.v1 import cpu_pb2_grpc as cpu_pb_grpc
from geryon.v1 import registry_pb2 as pb
from geryon.v1 import registry_pb2_grpc as pb_grpc

__all__ = [
    "RESUME_KEY",
    "cpu_pb",
    "cpu_pb_grpc",
    "event_from_pb",
    "event_to_pb",
    "header",
    "pb",
    "pb_grpc",
    "service_from_pb",
    "service_to_pb",
]

# Trailing metadata naming the revision a cut-off watcher resumes from.
RESUME_KEY = "geryon-resume-revision"

_EVENT_TYPE = {EventType.PUT: pb.Event.TYPE_PUT, EventType.DELETE: pb.Event.TYPE_DELETE}
_EVENT_TYPE_BACK = {v: k for k, v in _EVENT_TYPE.items()}


def header(revision: Revision) -> pb.ResponseHeader:
    return pb.ResponseHeader(revision=revision)


def service_to_pb(s: Service) -> pb.Service:
    return pb.Service(
        name=s.name,
        attrs=s.attrs,
        lease=s.lease,
        owner=s.owner,
        create_revision=s.create_revision,
        mod_revision=s.mod_revision,
    )


def service_from_pb(m: pb.Service) -> Service:
    return Service(m.name, dict(m.attrs), m.lease, m.owner, m.create_revision, m.mod_revision)


def event_to_pb(e: Event) -> pb.Event:
    return pb.Event(
        type=_EVENT_TYPE[e.type],
        service=service_to_pb(e.service),
        prev_service=service_to_pb(e.prev) if e.prev is not None else None,
        revision=e.revision,
    )


def event_from_pb(m: pb.Event) -> Event:
    return Event(
        _EVENT_TYPE_BACK[m.type],
        service_from_pb(m.service),
        service_from_pb(m.prev_service) if m.HasField("prev_service") else None,
        m.revision,
    )
