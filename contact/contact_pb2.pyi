from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClientMsg(_message.Message):
    __slots__ = ("msg",)
    MSG_FIELD_NUMBER: _ClassVar[int]
    msg: str
    def __init__(self, msg: _Optional[str] = ...) -> None: ...

class ServerMsg(_message.Message):
    __slots__ = ("task", "id", "attempt", "cancelled")
    TASK_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    task: str
    id: str
    attempt: int
    cancelled: bool
    def __init__(self, task: _Optional[str] = ..., id: _Optional[str] = ..., attempt: _Optional[int] = ..., cancelled: _Optional[bool] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Result(_message.Message):
    __slots__ = ("ret", "id", "error", "started", "more")
    RET_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    ret: str
    id: str
    error: str
    started: _containers.RepeatedScalarFieldContainer[str]
    more: _containers.RepeatedCompositeFieldContainer[Result]
    def __init__(self, ret: _Optional[str] = ..., id: _Optional[str] = ..., error: _Optional[str] = ..., started: _Optional[_Iterable[str]] = ..., more: _Optional[_Iterable[_Union[Result, _Mapping]]] = ...) -> None: ...
