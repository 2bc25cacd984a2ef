"""The one place handwritten code meets generated code.

Everything else imports the protobuf modules as ``pb``/``pb_grpc`` (the
registry) and ``cpu_pb``/``cpu_pb_grpc`` (the cpu service) from here, and turns
the registry's messages into model objects (and back) with these functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

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
    "snapshot_response",
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


def attrs_from_pb(m: Mapping[str, str]) -> dict[str, str]:
    """A protobuf map of attributes as a dict. Iterating the map itself is
    protobuf's C code; ``dict(m)`` and ``m.items()`` go through Python's
    Mapping mixins, at twice the cost."""
    return {k: m[k] for k in m}


def service_from_pb(m: pb.Service) -> Service:
    return Service(
        m.name, attrs_from_pb(m.attrs), m.lease, m.owner, m.create_revision, m.mod_revision
    )


def event_to_pb(e: Event) -> pb.Event:
    return pb.Event(
        type=_EVENT_TYPE[e.type],
        service=service_to_pb(e.service),
        prev_service=service_to_pb(e.prev) if e.prev is not None else None,
        revision=e.revision,
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# WatchResponse.events (field 3, length-delimited): the tag before each.
_EVENTS_TAG = b"\x1a"


def _snapshot_entry(s: Service) -> bytes:
    """``s`` as a snapshot's PUT event at its mod_revision, encoded as one
    element of WatchResponse.events; built once per entry, kept on it."""
    wire = s.wire
    if wire is None:
        event = pb.Event(
            type=pb.Event.TYPE_PUT, service=service_to_pb(s), revision=s.mod_revision
        ).SerializeToString()
        wire = _EVENTS_TAG + _varint(len(event)) + event
        object.__setattr__(s, "wire", wire)  # a cache, not a change: see Service.wire
    return wire


def snapshot_response(revision: Revision, services: Iterable[Service]) -> pb.WatchResponse:
    """A TYPE_SNAPSHOT message of ``services``: their encoded events joined
    and parsed in one call (protobuf's C code), not a message built in
    Python per entry."""
    head = pb.WatchResponse(header=header(revision), type=pb.WatchResponse.TYPE_SNAPSHOT)
    return pb.WatchResponse.FromString(
        head.SerializeToString() + b"".join(map(_snapshot_entry, services))
    )


def event_from_pb(m: pb.Event) -> Event:
    return Event(
        _EVENT_TYPE_BACK[m.type],
        service_from_pb(m.service),
        service_from_pb(m.prev_service) if m.HasField("prev_service") else None,
        m.revision,
    )
