from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResponseHeader(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class Service(_message.Message):
    __slots__ = ("name", "attrs", "lease", "owner", "create_revision", "mod_revision")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISION_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    attrs: _containers.ScalarMap[str, str]
    lease: int
    owner: str
    create_revision: int
    mod_revision: int
    def __init__(self, name: _Optional[str] = ..., attrs: _Optional[_Mapping[str, str]] = ..., lease: _Optional[int] = ..., owner: _Optional[str] = ..., create_revision: _Optional[int] = ..., mod_revision: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "attrs", "lease", "persist", "create_only")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    PERSIST_FIELD_NUMBER: _ClassVar[int]
    CREATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    name: str
    attrs: _containers.ScalarMap[str, str]
    lease: int
    persist: bool
    create_only: bool
    def __init__(self, name: _Optional[str] = ..., attrs: _Optional[_Mapping[str, str]] = ..., lease: _Optional[int] = ..., persist: _Optional[bool] = ..., create_only: _Optional[bool] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("header", "service")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    service: Service
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., service: _Optional[_Union[Service, _Mapping]] = ...) -> None: ...

class RegisterBatchRequest(_message.Message):
    __slots__ = ("services",)
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[RegisterRequest]
    def __init__(self, services: _Optional[_Iterable[_Union[RegisterRequest, _Mapping]]] = ...) -> None: ...

class RegisterBatchResponse(_message.Message):
    __slots__ = ("header", "create_revisions", "mod_revisions")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CREATE_REVISIONS_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISIONS_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    create_revisions: _containers.RepeatedScalarFieldContainer[int]
    mod_revisions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., create_revisions: _Optional[_Iterable[int]] = ..., mod_revisions: _Optional[_Iterable[int]] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("name", "set_attrs", "remove_attrs", "expected_mod_revision")
    class SetAttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SET_ATTRS_FIELD_NUMBER: _ClassVar[int]
    REMOVE_ATTRS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    set_attrs: _containers.ScalarMap[str, str]
    remove_attrs: _containers.RepeatedScalarFieldContainer[str]
    expected_mod_revision: int
    def __init__(self, name: _Optional[str] = ..., set_attrs: _Optional[_Mapping[str, str]] = ..., remove_attrs: _Optional[_Iterable[str]] = ..., expected_mod_revision: _Optional[int] = ...) -> None: ...

class UpdateResponse(_message.Message):
    __slots__ = ("header", "service")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    service: Service
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., service: _Optional[_Union[Service, _Mapping]] = ...) -> None: ...

class UnregisterRequest(_message.Message):
    __slots__ = ("name", "expected_mod_revision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    expected_mod_revision: int
    def __init__(self, name: _Optional[str] = ..., expected_mod_revision: _Optional[int] = ...) -> None: ...

class UnregisterResponse(_message.Message):
    __slots__ = ("header", "service")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    service: Service
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., service: _Optional[_Union[Service, _Mapping]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("header", "service")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    service: Service
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., service: _Optional[_Union[Service, _Mapping]] = ...) -> None: ...

class FindRequest(_message.Message):
    __slots__ = ("attrs", "prefix")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    attrs: _containers.ScalarMap[str, str]
    prefix: str
    def __init__(self, attrs: _Optional[_Mapping[str, str]] = ..., prefix: _Optional[str] = ...) -> None: ...

class FindResponse(_message.Message):
    __slots__ = ("header", "services")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    services: _containers.RepeatedCompositeFieldContainer[Service]
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., services: _Optional[_Iterable[_Union[Service, _Mapping]]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("create_request", "progress_request")
    CREATE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_REQUEST_FIELD_NUMBER: _ClassVar[int]
    create_request: WatchCreateRequest
    progress_request: WatchProgressRequest
    def __init__(self, create_request: _Optional[_Union[WatchCreateRequest, _Mapping]] = ..., progress_request: _Optional[_Union[WatchProgressRequest, _Mapping]] = ...) -> None: ...

class WatchCreateRequest(_message.Message):
    __slots__ = ("attrs", "prefix", "start_revision", "snapshot", "progress_interval_ms")
    class AttrsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ATTRS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    attrs: _containers.ScalarMap[str, str]
    prefix: str
    start_revision: int
    snapshot: bool
    progress_interval_ms: int
    def __init__(self, attrs: _Optional[_Mapping[str, str]] = ..., prefix: _Optional[str] = ..., start_revision: _Optional[int] = ..., snapshot: _Optional[bool] = ..., progress_interval_ms: _Optional[int] = ...) -> None: ...

class WatchProgressRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("header", "type", "events", "revision")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[WatchResponse.Type]
        TYPE_EVENTS: _ClassVar[WatchResponse.Type]
        TYPE_SNAPSHOT: _ClassVar[WatchResponse.Type]
        TYPE_SNAPSHOT_COMPLETE: _ClassVar[WatchResponse.Type]
        TYPE_PROGRESS: _ClassVar[WatchResponse.Type]
    TYPE_UNSPECIFIED: WatchResponse.Type
    TYPE_EVENTS: WatchResponse.Type
    TYPE_SNAPSHOT: WatchResponse.Type
    TYPE_SNAPSHOT_COMPLETE: WatchResponse.Type
    TYPE_PROGRESS: WatchResponse.Type
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    type: WatchResponse.Type
    events: _containers.RepeatedCompositeFieldContainer[Event]
    revision: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., type: _Optional[_Union[WatchResponse.Type, str]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("type", "service", "prev_service", "revision")
    class Type(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TYPE_UNSPECIFIED: _ClassVar[Event.Type]
        TYPE_PUT: _ClassVar[Event.Type]
        TYPE_DELETE: _ClassVar[Event.Type]
    TYPE_UNSPECIFIED: Event.Type
    TYPE_PUT: Event.Type
    TYPE_DELETE: Event.Type
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    PREV_SERVICE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: Event.Type
    service: Service
    prev_service: Service
    revision: int
    def __init__(self, type: _Optional[_Union[Event.Type, str]] = ..., service: _Optional[_Union[Service, _Mapping]] = ..., prev_service: _Optional[_Union[Service, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class GrantRequest(_message.Message):
    __slots__ = ("ttl_ms",)
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    ttl_ms: int
    def __init__(self, ttl_ms: _Optional[int] = ...) -> None: ...

class GrantResponse(_message.Message):
    __slots__ = ("header", "lease", "ttl_ms")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    lease: int
    ttl_ms: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., lease: _Optional[int] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: int
    def __init__(self, lease: _Optional[int] = ...) -> None: ...

class KeepAliveResponse(_message.Message):
    __slots__ = ("header", "lease", "ttl_ms")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    lease: int
    ttl_ms: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., lease: _Optional[int] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: int
    def __init__(self, lease: _Optional[int] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("header", "deleted")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    deleted: int
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., deleted: _Optional[int] = ...) -> None: ...

class LeasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaseInfo(_message.Message):
    __slots__ = ("lease", "ttl_ms", "remaining_ms", "owner", "services")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_MS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    lease: int
    ttl_ms: int
    remaining_ms: int
    owner: str
    services: int
    def __init__(self, lease: _Optional[int] = ..., ttl_ms: _Optional[int] = ..., remaining_ms: _Optional[int] = ..., owner: _Optional[str] = ..., services: _Optional[int] = ...) -> None: ...

class LeasesResponse(_message.Message):
    __slots__ = ("header", "leases")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    header: ResponseHeader
    leases: _containers.RepeatedCompositeFieldContainer[LeaseInfo]
    def __init__(self, header: _Optional[_Union[ResponseHeader, _Mapping]] = ..., leases: _Optional[_Iterable[_Union[LeaseInfo, _Mapping]]] = ...) -> None: ...
