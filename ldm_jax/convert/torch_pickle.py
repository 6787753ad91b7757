"""Reading ``torch.save`` files into numpy without torch and without running their code.

A PyTorch checkpoint is a pickle. Unpickling calls whatever functions the file
names, so ``torch.load(weights_only=False)`` on a downloaded ``.ckpt`` runs
arbitrary code. Here every global the pickle asks for goes through
``_RestrictedUnpickler.find_class``, which never imports anything: it returns
this module's own stand-ins for an explicit allow-list (the tensor-rebuilding
functions, storage types, dtypes, ``OrderedDict``, container builtins, numpy
scalars) and inert ``PickledObject`` placeholders for a few metadata classes
(Lightning callbacks, ``torch.torch_version``). Any other name raises
``UnsafePickleError`` before it is resolved. The pickle opcodes that call
objects (REDUCE, BUILD, INST, OBJ, NEWOBJ) only ever see those stand-ins, and
the stand-ins refuse BUILD, so a file cannot patch them either.

Formats:

* zip archives (``torch.save`` since 1.6): ``<name>/data.pkl`` plus one
  ``<name>/data/<key>`` record per storage and ``<name>/byteorder``. Stored
  (uncompressed) records are read straight from the file; only the bytes a
  tensor spans are read.
* the legacy stream (``_use_new_zipfile_serialization=False``, torch < 1.6):
  magic number, protocol version and system info pickles, the object pickle,
  the list of storage keys, then each storage as an int64 element count and
  its raw little-endian bytes. The object pickle is unpickled twice (once to
  learn the storage dtypes, once with the data), both times restricted.
* not supported, with a message saying how to convert: the pre-0.4 tar format,
  TorchScript archives, sparse / quantized / nested / meta tensors, numpy
  arrays inside the pickle.

Tensors come back as C-contiguous numpy arrays with the file's dtype
(bfloat16 and float8 via ml_dtypes); views of one storage (transposes,
slices with a storage offset, tensors sharing a storage) are rebuilt with
their strides and offsets and then copied, so no two arrays share memory.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import pickle
import struct
import zipfile
from typing import Any, Dict, Optional, Tuple

import ml_dtypes
import numpy as np

from ldm_jax.convert.errors import CheckpointError, UnsafePickleError

# torch/serialization.py: MAGIC_NUMBER and PROTOCOL_VERSION of the legacy stream.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_CONVERT_HINT = ("convert it once where PyTorch is available: torch.load it (only if you trust "
                 "its source) and save the state dict with safetensors.torch.save_file, or "
                 "re-save it with torch.save in the default zip format")

# torch dtype attribute names (``torch.float16`` pickles as GLOBAL 'torch float16') -> numpy.
_TORCH_DTYPES: Dict[str, np.dtype] = {
    name: np.dtype(dt) for names, dt in [
        (("float32", "float"), np.float32), (("float64", "double"), np.float64),
        (("float16", "half"), np.float16), (("bfloat16",), ml_dtypes.bfloat16),
        (("int64", "long"), np.int64), (("int32", "int"), np.int32),
        (("int16", "short"), np.int16), (("int8",), np.int8), (("uint8",), np.uint8),
        (("uint16",), np.uint16), (("uint32",), np.uint32), (("uint64",), np.uint64),
        (("bool",), np.bool_), (("complex64", "cfloat"), np.complex64),
        (("complex128", "cdouble"), np.complex128),
        (("float8_e4m3fn",), ml_dtypes.float8_e4m3fn), (("float8_e5m2",), ml_dtypes.float8_e5m2),
        (("float8_e4m3fnuz",), ml_dtypes.float8_e4m3fnuz),
        (("float8_e5m2fnuz",), ml_dtypes.float8_e5m2fnuz),
    ] for name in names
}

# Legacy typed storage classes (``torch.FloatStorage``; ``torch.cuda.FloatStorage`` in
# pre-1.6 GPU checkpoints) -> element dtype. Untyped storages hold bytes (uint8).
_STORAGE_DTYPES: Dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}
_UNTYPED_STORAGES = ("UntypedStorage", "_UntypedStorage", "TypedStorage", "_TypedStorage")

# Harmless-to-name torch features this reader does not rebuild: CheckpointError, not
# UnsafePickleError, so the message says what to do instead.
_UNSUPPORTED = {
    **{f"torch._utils.{fn}": kind for fn, kind in [
        ("_rebuild_sparse_tensor", "sparse tensors"), ("_rebuild_sparse_csr_tensor", "sparse tensors"),
        ("_rebuild_qtensor", "quantized tensors"), ("_rebuild_nested_tensor", "nested tensors"),
        ("_rebuild_meta_tensor_no_storage", "meta tensors (no data)"),
        ("_rebuild_wrapper_subclass", "tensor subclasses"),
        ("_rebuild_device_tensor_from_numpy", "XLA/MTIA device tensors"),
        ("_rebuild_device_tensor_from_cpu_tensor", "XLA/MTIA device tensors"),
        ("_rebuild_xla_tensor", "XLA tensors"), ("_rebuild_mps_tensor", "MPS tensors"),
    ]},
    **{f"torch.{s}": "quantized tensors" for s in (
        "QInt8Storage", "QUInt8Storage", "QInt32Storage", "QUInt4x2Storage", "QUInt2x4Storage")},
    "torch.ComplexHalfStorage": "complex32 tensors",
    "numpy.core.multiarray._reconstruct": "numpy arrays",
    "numpy._core.multiarray._reconstruct": "numpy arrays",
}

# Metadata classes that are replaced by an inert placeholder instead of being imported.
_PLACEHOLDER_MODULES = ("pytorch_lightning.callbacks", "lightning.pytorch.callbacks",
                        "torch.torch_version")
_ATTRIBUTE_DICTS = ("pytorch_lightning.utilities.parsing.AttributeDict",
                    "lightning.pytorch.utilities.parsing.AttributeDict",
                    "lightning.fabric.utilities.data.AttributeDict",
                    "lightning_fabric.utilities.data.AttributeDict")

# Renamed modules: torch's own, and the Python-2 names that Python 3 writes for protocol
# <= 2 (fix_imports; e.g. builtins -> __builtin__), mapped back as pickle.Unpickler does.
_RENAMED_MODULES = {**_compat_pickle.IMPORT_MAPPING, "torch.tensor": "torch._tensor"}


def _py3_name(module: str, name: str) -> Tuple[str, str]:
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _RENAMED_MODULES.get(module, module), name


# ----------------------------------------------------------------------------- placeholders


class _FrozenMeta(type):
    """Metaclass of the placeholder classes: a pickle's BUILD cannot set class attributes."""

    def __setattr__(cls, name, value):
        raise TypeError(f"the pickle tried to set {name!r} on the placeholder class {cls.__name__}")

    def __delattr__(cls, name):
        raise TypeError(f"the pickle tried to delete {name!r} from {cls.__name__}")


class PickledObject(metaclass=_FrozenMeta):
    """Inert stand-in for an instance of a metadata class that was not imported.

    ``pickled_class`` is the dotted name in the file; ``args`` / ``kwargs`` what its
    constructor would have got, ``state`` what ``__setstate__`` would have got, and
    ``items`` / ``list_items`` what SETITEM / APPEND would have added.
    """

    pickled_class = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        self.items, self.list_items = {}, []
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.list_items.append(value)

    def extend(self, values):
        self.list_items.extend(values)

    def __repr__(self):
        return f"<placeholder for {self.pickled_class} (not imported)>"


class TorchVersionString(str, metaclass=_FrozenMeta):
    """What ``torch.torch_version.TorchVersion`` (a str subclass) becomes: a plain string."""


class AttributeDict(dict, metaclass=_FrozenMeta):
    """What Lightning's ``AttributeDict`` (hyper-parameters, a dict subclass) becomes."""


def _placeholder_class(module: str, name: str) -> type:
    return _FrozenMeta(name, (PickledObject,), {
        "__module__": module, "__qualname__": name, "pickled_class": f"{module}.{name}"})


# ----------------------------------------------------------------------------- stand-ins


class _Global:
    """Base of the objects ``find_class`` returns: immutable, and refuses BUILD."""

    __slots__ = ("qualname",)

    def __init__(self, qualname: str):
        object.__setattr__(self, "qualname", qualname)

    def __setattr__(self, name, value):
        raise TypeError(f"the pickle tried to set {name!r} on {self.qualname}")

    def __setstate__(self, state):
        raise TypeError(f"the pickle tried to set the state of {self.qualname}")

    def __repr__(self):
        return self.qualname


class _Callable(_Global):
    """A safe function standing in for an allow-listed callable global."""

    __slots__ = ("fn",)

    def __init__(self, qualname: str, fn):
        super().__init__(qualname)
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args):
        return self.fn(*args)


class _StorageType(_Global):
    """``torch.FloatStorage`` etc.; ``dtype`` None for untyped (byte) storages."""

    __slots__ = ("dtype",)

    def __init__(self, qualname: str, dtype: Optional[np.dtype]):
        super().__init__(qualname)
        object.__setattr__(self, "dtype", dtype)


class TorchDtype(_Global):
    """``torch.float16`` etc. as found in a pickle; ``numpy`` is the matching numpy dtype."""

    __slots__ = ("numpy",)

    def __init__(self, qualname: str, dtype: np.dtype):
        super().__init__(qualname)
        object.__setattr__(self, "numpy", dtype)


class _Storage:
    """A storage record of the file: ``nbytes`` bytes from ``base`` in record ``key``."""

    __slots__ = ("reader", "key", "dtype", "nbytes", "base")

    def __init__(self, reader, key: str, dtype: Optional[np.dtype], nbytes: int, base: int = 0):
        self.reader, self.key, self.dtype, self.nbytes, self.base = reader, key, dtype, nbytes, base

    def __setstate__(self, state):
        raise TypeError("the pickle tried to set the state of a storage")

    def __repr__(self):
        return f"<storage {self.key!r}: {self.nbytes} bytes of {self.dtype}>"


def _int_tuple(value, what: str) -> Tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise TypeError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return tuple(value)


def _tensor(storage, offset, size, stride, dtype: Optional[np.dtype] = None):
    """The tensor ``storage[offset + sum(i_k * stride_k)]`` over ``size``, copied to C order.

    ``offset`` and ``stride`` count elements of ``dtype`` (the storage's own dtype unless
    given, as ``_rebuild_tensor_v3`` does for untyped storages).
    """
    if not isinstance(storage, _Storage):
        raise TypeError(f"expected a storage, got {type(storage).__name__}")
    dtype = storage.dtype if dtype is None else dtype
    if dtype is None:
        raise TypeError("an untyped storage needs a dtype")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride) or not isinstance(offset, int) or offset < 0:
        raise TypeError(f"bad tensor geometry: size {size}, stride {stride}, offset {offset!r}")
    if storage.reader is None:  # first pass over a legacy file: data not located yet
        return None
    itemsize = dtype.itemsize
    numel = math.prod(size)
    if numel == 0:
        return np.zeros(size, dtype)
    # One past the last element the view touches, in elements of `dtype`.
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if extent * itemsize > storage.nbytes:
        raise CheckpointError(
            f"{storage.reader.path}: a tensor of shape {size} (stride {stride}, offset {offset}) "
            f"reaches byte {extent * itemsize} of storage {storage.key!r}, which has only "
            f"{storage.nbytes} bytes; the file is corrupt")
    raw = storage.reader.read(storage.key, storage.base + offset * itemsize,
                              storage.base + extent * itemsize)
    file_dtype = dtype.newbyteorder(">") if storage.reader.big_endian else dtype
    flat = np.frombuffer(raw, dtype=file_dtype)
    c_strides = np.cumprod((1,) + size[:0:-1])[::-1] if size else ()
    contiguous = all(n == 1 or s == c for n, s, c in zip(size, stride, c_strides))
    if contiguous and extent - offset == numel:
        arr = flat.reshape(size)  # owns `raw`, which nothing else holds: no copy needed
    else:
        view = np.lib.stride_tricks.as_strided(
            flat, shape=size, strides=[s * itemsize for s in stride], writeable=False)
        arr = np.array(view, order="C")  # copy: the result shares nothing
    return arr.astype(dtype) if storage.reader.big_endian else arr


# torch/_utils.py signatures; requires_grad, backward hooks and metadata are dropped.
def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    if not isinstance(dtype, TorchDtype):
        raise TypeError(f"_rebuild_tensor_v3 needs a torch dtype, got {dtype!r}")
    return _tensor(storage, storage_offset, size, stride, dtype.numpy)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


_TENSOR_REBUILDERS = {"_rebuild_tensor": _rebuild_tensor, "_rebuild_tensor_v2": _rebuild_tensor_v2,
                      "_rebuild_tensor_v3": _rebuild_tensor_v3}


def _rebuild_from_type_v2(func, new_type, args, state):
    # torch/_tensor.py: a tensor with Python attributes or of a Tensor subclass; the
    # attributes (`state`) are dropped, the subclass must be Tensor or Parameter.
    if not (isinstance(func, _Callable) and func.fn in _TENSOR_REBUILDERS.values()):
        raise TypeError(f"_rebuild_from_type_v2 with {func!r}")
    if not isinstance(new_type, _Global) or new_type.qualname not in _TENSOR_TYPES:
        raise TypeError(f"_rebuild_from_type_v2 with type {new_type!r}")
    return func(*args)


_TENSOR_TYPES = ("torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter")


def _torch_size(dims=()):
    return _int_tuple(dims, "torch.Size")


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or isinstance(index, int)):
        raise TypeError(f"torch.device({kind!r}, {index!r})")
    return kind if index is None else f"{kind}:{index}"


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles write bytes as _codecs.encode(latin1 str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise TypeError(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode(encoding)


def _bytes(data=b"", *rest):
    # bytes()/bytearray() of an int would allocate that many bytes: only copy bytes.
    if rest or not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"bytes({type(data).__name__})")
    return bytes(data)


def _bytearray(data=b"", *rest):
    if rest and isinstance(data, str) and rest[0] in ("latin1", "latin-1"):
        return bytearray(data.encode("latin1"))
    return bytearray(_bytes(data, *rest))


def _reconstructor(cls, base, state):
    # copyreg._reconstructor (protocol 0/1 objects): only for placeholder classes.
    if isinstance(cls, type) and issubclass(cls, PickledObject) and state is None:
        return cls.__new__(cls)
    raise TypeError(f"copyreg._reconstructor for {cls!r}")


class _NumpyDtype:
    """``numpy.dtype(name, align, copy)`` plus its BUILD state, for simple dtypes only."""

    __slots__ = ("dtype",)

    def __init__(self, name, align=False, copy=False):
        if not isinstance(name, str):
            raise TypeError(f"numpy.dtype({name!r})")
        dtype = np.dtype(name)  # parses a type string; imports and calls nothing
        if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
            raise TypeError(f"numpy dtype {name!r} is not a plain number type")
        self.dtype = dtype

    def __setstate__(self, state):
        # (version, byteorder, subdescr, names, fields, elsize, alignment, flags)
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in "<>|="
                and state[2] is None and state[3] is None and state[4] is None):
            raise TypeError(f"unsupported numpy dtype state {state!r}")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])


def _numpy_scalar(dtype, data):
    # numpy.core.multiarray.scalar(dtype, raw bytes): rebuilt from the bytes.
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, bytes) \
            or len(data) != dtype.dtype.itemsize:
        raise TypeError(f"numpy scalar of {dtype!r} from {type(data).__name__}")
    return np.frombuffer(data, dtype.dtype)[0].astype(dtype.dtype.newbyteorder("="))


def _allow_list() -> Dict[str, Any]:
    """Dotted name -> what ``find_class`` returns for it."""
    allowed: Dict[str, Any] = {}
    for name, fn in [*_TENSOR_REBUILDERS.items(), ("_rebuild_parameter", _rebuild_parameter),
                     ("_rebuild_parameter_with_state", _rebuild_parameter_with_state)]:
        allowed[f"torch._utils.{name}"] = _Callable(f"torch._utils.{name}", fn)
    allowed["torch._tensor._rebuild_from_type_v2"] = _Callable(
        "torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2)
    for name in _TENSOR_TYPES:
        allowed[name] = _Global(name)
    for module in ("torch", "torch.cuda"):
        for name, dtype in _STORAGE_DTYPES.items():
            allowed[f"{module}.{name}"] = _StorageType(f"{module}.{name}", dtype)
    for module in ("torch", "torch.storage"):
        for name in _UNTYPED_STORAGES:
            allowed[f"{module}.{name}"] = _StorageType(f"{module}.{name}", None)
    for name, dtype in _TORCH_DTYPES.items():
        allowed[f"torch.{name}"] = TorchDtype(f"torch.{name}", dtype)
    allowed["torch.Size"] = _Callable("torch.Size", _torch_size)
    allowed["torch.device"] = _Callable("torch.device", _torch_device)
    allowed["collections.OrderedDict"] = collections.OrderedDict  # C type: immutable
    for name, obj in [("set", set), ("frozenset", frozenset), ("complex", complex),
                      ("slice", slice), ("range", range)]:
        allowed[f"builtins.{name}"] = obj  # C types: calling them runs no Python code
    allowed["builtins.bytes"] = _Callable("builtins.bytes", _bytes)
    allowed["builtins.bytearray"] = _Callable("builtins.bytearray", _bytearray)
    allowed["builtins.object"] = _Global("builtins.object")
    allowed["_codecs.encode"] = _Callable("_codecs.encode", _codecs_encode)
    allowed["copyreg._reconstructor"] = _Callable("copyreg._reconstructor", _reconstructor)
    allowed["numpy.dtype"] = _Callable("numpy.dtype", _NumpyDtype)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[f"{module}.scalar"] = _Callable(f"{module}.scalar", _numpy_scalar)
    allowed["torch.torch_version.TorchVersion"] = TorchVersionString
    for name in _ATTRIBUTE_DICTS:
        allowed[name] = AttributeDict
    return allowed


_ALLOWED = _allow_list()


# ----------------------------------------------------------------------------- unpickler


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals come only from ``_ALLOWED`` or placeholder classes."""

    def __init__(self, file, path: str, reader, storages: Optional[Dict[str, tuple]] = None):
        super().__init__(file)
        self.path, self.reader = path, reader
        self.storages = storages  # legacy first pass: key -> (dtype, nbytes) seen
        self.placeholders: Dict[str, type] = {}

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafePickleError(f"{self.path}: the pickle asks for a global with a non-string "
                                    "name; nothing was imported or executed")
        module, name = _py3_name(module, name)
        qualname = f"{module}.{name}"
        if qualname in _ALLOWED:
            return _ALLOWED[qualname]
        if qualname in _UNSUPPORTED:
            raise CheckpointError(
                f"{self.path}: holds {_UNSUPPORTED[qualname]} ({qualname}), which this reader "
                f"does not support; {_CONVERT_HINT}")
        if any(module == m or module.startswith(m + ".") for m in _PLACEHOLDER_MODULES) \
                and name.isidentifier():
            if qualname not in self.placeholders:
                self.placeholders[qualname] = _placeholder_class(module, name)
            return self.placeholders[qualname]
        raise UnsafePickleError(
            f"{self.path}: refused to load: its pickle asks for the global `{qualname}`, which is "
            "not on the allow-list (tensor-rebuilding functions, storage and dtype names, "
            "OrderedDict, container builtins, numpy scalars, Lightning callback metadata). "
            "Nothing from the file was imported or executed. If you trust the file, "
            + _CONVERT_HINT)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
            kind = pid[0] if isinstance(pid, tuple) and pid else pid
            if kind in ("module", b"module"):
                raise CheckpointError(f"{self.path}: holds a pickled nn.Module, not a state dict; "
                                      + _CONVERT_HINT)
            raise CheckpointError(f"{self.path}: unknown persistent id {kind!r}")
        if len(pid) == 5:  # zip: (storage, type, key, location, numel)
            _, storage_type, key, _location, numel = pid
            view = None
        elif len(pid) == 6:  # legacy: ... plus view_metadata
            _, storage_type, key, _location, numel, view = pid
        else:
            raise CheckpointError(f"{self.path}: malformed storage id {pid!r}")
        if not isinstance(storage_type, _StorageType):
            raise TypeError(f"storage id names {storage_type!r}, not a storage type")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise TypeError(f"malformed storage id {pid!r}")
        dtype = storage_type.dtype
        nbytes = numel * (1 if dtype is None else dtype.itemsize)
        if self.storages is not None:
            self.storages.setdefault(key, (dtype, nbytes))
        if view is None:
            return _Storage(self.reader, key, dtype, nbytes)
        # Pre-1.0 storage views: (view key, element offset, element count).
        if not (isinstance(view, tuple) and len(view) == 3
                and all(isinstance(v, int) and v >= 0 for v in view[1:])):
            raise TypeError(f"malformed storage view {view!r}")
        itemsize = 1 if dtype is None else dtype.itemsize
        if (view[1] + view[2]) * itemsize > nbytes:
            raise CheckpointError(f"{self.path}: storage view {view!r} exceeds storage {key!r}")
        return _Storage(self.reader, key, dtype, view[2] * itemsize, view[1] * itemsize)


def _unpickle(data, path: str, reader, storages=None):
    """Run the restricted unpickler; every failure becomes a CheckpointError naming ``path``."""
    file = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        return _RestrictedUnpickler(file, path, reader, storages).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 -- any malformed pickle: report, never propagate raw
        raise CheckpointError(f"{path}: corrupt or unsupported pickle "
                              f"({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------- storage readers


class _RangeReader:
    """Reads byte ranges of storage records from one open file."""

    def __init__(self, path: str, file, big_endian: bool = False):
        self.path, self.file, self.big_endian = path, file, big_endian
        self.size = os.fstat(file.fileno()).st_size

    def _read_at(self, offset: int, n: int, key: str) -> bytearray:
        if offset + n > self.size:
            raise CheckpointError(f"{self.path}: truncated: storage {key!r} needs bytes up to "
                                  f"{offset + n}, the file has {self.size}")
        buf = bytearray(n)
        self.file.seek(offset)
        if self.file.readinto(buf) != n:
            raise CheckpointError(f"{self.path}: truncated while reading storage {key!r}")
        return buf


class _ZipReader(_RangeReader):
    def __init__(self, path: str, file, archive: zipfile.ZipFile, prefix: str, big_endian: bool):
        super().__init__(path, file, big_endian)
        self.archive, self.prefix = archive, prefix
        self.data_starts: Dict[str, int] = {}

    def _info(self, key: str) -> zipfile.ZipInfo:
        try:
            return self.archive.getinfo(f"{self.prefix}data/{key}")
        except KeyError:
            raise CheckpointError(f"{self.path}: the pickle refers to storage {key!r} but the "
                                  f"archive has no record {self.prefix}data/{key}") from None

    def read(self, key: str, start: int, stop: int) -> bytearray:
        info = self._info(key)
        if stop > info.file_size:
            raise CheckpointError(f"{self.path}: record {info.filename} has {info.file_size} bytes, "
                                  f"a tensor needs {stop}; the file is corrupt")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
            with self.archive.open(info) as f:  # re-compressed archive: slow but correct
                f.seek(start)
                data = f.read(stop - start)
            if len(data) != stop - start:
                raise CheckpointError(f"{self.path}: truncated record {info.filename}")
            return bytearray(data)
        if key not in self.data_starts:
            # Local file header: 30 bytes, then the name and the extra field.
            head = self._read_at(info.header_offset, 30, key)
            if head[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{self.path}: corrupt zip header for {info.filename}")
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            self.data_starts[key] = info.header_offset + 30 + name_len + extra_len
        return self._read_at(self.data_starts[key] + start, stop - start, key)


class _LegacyReader(_RangeReader):
    def __init__(self, path: str, file, locations: Dict[str, Tuple[int, int]]):
        super().__init__(path, file)
        self.locations = locations  # key -> (file offset of its data, nbytes)

    def read(self, key: str, start: int, stop: int) -> bytearray:
        offset, nbytes = self.locations[key]
        if stop > nbytes:
            raise CheckpointError(f"{self.path}: storage {key!r} is shorter than a tensor needs")
        return self._read_at(offset + start, stop - start, key)


# ----------------------------------------------------------------------------- formats


def load_torch_pickle(path: str) -> Any:
    """The object ``torch.save`` wrote to ``path``, with every tensor as a numpy array.

    Usually a state dict, or a wrapper like ``{"state_dict": {...}, "global_step": N}``.
    Raises ``UnsafePickleError`` if the pickle names anything outside the allow-list (and
    runs none of it) and ``CheckpointError`` for truncated, corrupt or unsupported files.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(512)
        if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < (1 << 27):
            raise CheckpointError(f"{path}: looks like a safetensors file, not a pickle; read it "
                                  "with ldm_jax.convert.weights_io.read_safetensors")
        if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            return _load_zip(path, f)
        if head[257:262] == b"ustar":
            raise CheckpointError(f"{path}: a tar-format PyTorch checkpoint (torch < 0.4), which "
                                  f"is not supported; {_CONVERT_HINT}")
        if head[:1] == b"\x80":
            return _load_legacy(path, f)
    raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive "
                          f"nor a legacy torch pickle; {len(head)} bytes read)")


def _load_zip(path: str, f) -> Any:
    try:
        archive = zipfile.ZipFile(f)
        names = archive.namelist()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt zip archive ({e})") from None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise CheckpointError(f"{path}: a TorchScript archive (torch.jit.save), not a "
                              f"torch.save checkpoint; not supported: {_CONVERT_HINT}")
    pickles = [n for n in names if n.count("/") <= 1 and n.rsplit("/", 1)[-1] == "data.pkl"]
    if len(pickles) != 1:
        raise CheckpointError(f"{path}: a zip archive without exactly one <name>/data.pkl "
                              f"({len(pickles)} found); not a torch.save checkpoint")
    prefix = pickles[0][: -len("data.pkl")]
    try:
        order = archive.read(prefix + "byteorder").decode().strip() \
            if prefix + "byteorder" in names else "little"
        data = archive.read(pickles[0])
    except (zipfile.BadZipFile, EOFError, OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt zip archive ({e})") from None
    if order not in ("little", "big"):
        raise CheckpointError(f"{path}: unknown byteorder {order!r}")
    reader = _ZipReader(path, f, archive, prefix, big_endian=order == "big")
    return _unpickle(data, path, reader)


def _load_legacy(path: str, f) -> Any:
    f.seek(0)
    magic = _unpickle(f, path, None)
    if magic != _LEGACY_MAGIC or isinstance(magic, bool):
        raise CheckpointError(f"{path}: a plain pickle, not a PyTorch checkpoint (no torch magic "
                              "number); only torch.save files are read")
    version = _unpickle(f, path, None)
    if version != _LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: unsupported legacy torch protocol version {version!r}")
    sys_info = _unpickle(f, path, None)
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
        raise CheckpointError(f"{path}: a big-endian legacy checkpoint; {_CONVERT_HINT}")
    start = f.tell()
    # Pass 1: learn the storages (key -> dtype, nbytes) without reading data.
    storages: Dict[str, tuple] = {}
    _unpickle(f, path, None, storages)
    end = f.tell()
    keys = _unpickle(f, path, None)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise CheckpointError(f"{path}: corrupt legacy checkpoint (bad storage key list)")
    size = os.fstat(f.fileno()).st_size
    offset, locations = f.tell(), {}
    for key in keys:
        if key not in storages:
            raise CheckpointError(f"{path}: storage {key!r} is listed but never used")
        dtype, nbytes = storages[key]
        f.seek(offset)
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated: storage {key!r} is missing")
        (count,) = struct.unpack("<q", head)
        stored = count * (1 if dtype is None else dtype.itemsize)
        if count < 0 or stored < nbytes:
            raise CheckpointError(f"{path}: storage {key!r} has {stored} bytes, expected {nbytes}")
        if offset + 8 + stored > size:
            raise CheckpointError(f"{path}: truncated: storage {key!r} needs bytes up to "
                                  f"{offset + 8 + stored}, the file has {size}")
        locations[key] = (offset + 8, stored)
        offset += 8 + stored
    missing = sorted(set(storages) - set(locations))
    if missing:
        raise CheckpointError(f"{path}: storages {missing[:3]} have no data")
    # Pass 2: the same object pickle (in memory: the reader seeks `f`), data located.
    f.seek(start)
    object_pickle = f.read(end - start)
    return _unpickle(object_pickle, path, _LegacyReader(path, f, locations))
