from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class UpdateEnvelope(_message.Message):
    __slots__ = ("format_version", "context_fingerprint", "key_epoch", "layout", "chunks", "sample_weight", "job", "server_round", "scheme", "scale_bits", "value_bound_bits")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KEY_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    SCALE_BITS_FIELD_NUMBER: _ClassVar[int]
    VALUE_BOUND_BITS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    context_fingerprint: str
    key_epoch: int
    layout: Layout
    chunks: _containers.RepeatedScalarFieldContainer[bytes]
    sample_weight: float
    job: str
    server_round: int
    scheme: str
    scale_bits: int
    value_bound_bits: int
    def __init__(self, format_version: _Optional[int] = ..., context_fingerprint: _Optional[str] = ..., key_epoch: _Optional[int] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., chunks: _Optional[_Iterable[bytes]] = ..., sample_weight: _Optional[float] = ..., job: _Optional[str] = ..., server_round: _Optional[int] = ..., scheme: _Optional[str] = ..., scale_bits: _Optional[int] = ..., value_bound_bits: _Optional[int] = ...) -> None: ...
