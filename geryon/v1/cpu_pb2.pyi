from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SessionRequest(_message.Message):
    __slots__ = ("start", "stdin", "close_stdin", "signal", "window", "output_consumed")
    START_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    CLOSE_STDIN_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    start: Start
    stdin: bytes
    close_stdin: bool
    signal: str
    window: WindowSize
    output_consumed: int
    def __init__(self, start: _Optional[_Union[Start, _Mapping]] = ..., stdin: _Optional[bytes] = ..., close_stdin: _Optional[bool] = ..., signal: _Optional[str] = ..., window: _Optional[_Union[WindowSize, _Mapping]] = ..., output_consumed: _Optional[int] = ...) -> None: ...

class Start(_message.Message):
    __slots__ = ("argv", "env", "dir", "terminal", "mounts", "output_window")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ARGV_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    DIR_FIELD_NUMBER: _ClassVar[int]
    TERMINAL_FIELD_NUMBER: _ClassVar[int]
    MOUNTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    argv: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    dir: str
    terminal: Terminal
    mounts: _containers.RepeatedScalarFieldContainer[str]
    output_window: int
    def __init__(self, argv: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., dir: _Optional[str] = ..., terminal: _Optional[_Union[Terminal, _Mapping]] = ..., mounts: _Optional[_Iterable[str]] = ..., output_window: _Optional[int] = ...) -> None: ...

class Terminal(_message.Message):
    __slots__ = ("term", "size")
    TERM_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    term: str
    size: WindowSize
    def __init__(self, term: _Optional[str] = ..., size: _Optional[_Union[WindowSize, _Mapping]] = ...) -> None: ...

class WindowSize(_message.Message):
    __slots__ = ("rows", "cols", "width_px", "height_px")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_PX_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_PX_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    width_px: int
    height_px: int
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., width_px: _Optional[int] = ..., height_px: _Optional[int] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("started", "stdout", "stderr", "stdin_consumed", "exit")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    STDIN_CONSUMED_FIELD_NUMBER: _ClassVar[int]
    EXIT_FIELD_NUMBER: _ClassVar[int]
    started: Started
    stdout: bytes
    stderr: bytes
    stdin_consumed: int
    exit: Exit
    def __init__(self, started: _Optional[_Union[Started, _Mapping]] = ..., stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., stdin_consumed: _Optional[int] = ..., exit: _Optional[_Union[Exit, _Mapping]] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("session", "node", "account", "pid", "stdin_window", "output_window")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STDIN_WINDOW_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    session: str
    node: str
    account: str
    pid: int
    stdin_window: int
    output_window: int
    def __init__(self, session: _Optional[str] = ..., node: _Optional[str] = ..., account: _Optional[str] = ..., pid: _Optional[int] = ..., stdin_window: _Optional[int] = ..., output_window: _Optional[int] = ...) -> None: ...

class Exit(_message.Message):
    __slots__ = ("code", "signal", "ended_by_service")
    CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    ENDED_BY_SERVICE_FIELD_NUMBER: _ClassVar[int]
    code: int
    signal: str
    ended_by_service: str
    def __init__(self, code: _Optional[int] = ..., signal: _Optional[str] = ..., ended_by_service: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node", "ncpu", "load", "sessions", "max_sessions", "max_sessions_per_identity")
    NODE_FIELD_NUMBER: _ClassVar[int]
    NCPU_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_PER_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    node: str
    ncpu: int
    load: float
    sessions: int
    max_sessions: int
    max_sessions_per_identity: int
    def __init__(self, node: _Optional[str] = ..., ncpu: _Optional[int] = ..., load: _Optional[float] = ..., sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., max_sessions_per_identity: _Optional[int] = ...) -> None: ...
