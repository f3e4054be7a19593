"""Read a fairseq checkpoint (a ``torch.save`` zip file) without fairseq, omegaconf or ``torch.load``.

A checkpoint is a zip archive ``<prefix>/data.pkl`` (the pickled object tree) + ``<prefix>/data/<key>``
(one raw little-endian storage per key) + small records (``byteorder``, ``.format_version``). The
pickle is read by :class:`RestrictedUnpickler`, which resolves only an allow-list of names, each to
code of this module or to an inert data type, so reading a checkpoint never runs code from it:

- tensors: ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor_v3`` / ``_rebuild_parameter`` /
  ``_rebuild_parameter_with_state`` -> our own functions returning a :class:`TensorRef` (where the
  bytes are; nothing is read yet), storage classes (``torch.FloatStorage`` ...) and ``torch`` dtypes
  -> markers; the persistent id ``("storage", type, key, location, numel)`` -> :class:`StorageRef`;
- data: ``builtins`` dict, list, tuple, set, frozenset, int, float, str, bytes, bytearray, bool,
  complex, slice; ``_codecs.encode(str, "latin1")`` (protocol 2's spelling of bytes);
  ``collections.OrderedDict`` / ``defaultdict`` (as plain dicts); ``argparse.Namespace``;
- configuration classes of ``omegaconf.*``, ``fairseq.*``, ``typing.*``, ``enum.*``, StreamSpeech's
  plugin packages (``ctc_unity``, ``chunk_unity``, ``uni_unity``) and numpy's scalar/array pickles ->
  :class:`PickledObject` stubs that only record what they were built with (:func:`to_plain` turns
  them into dicts and values); ``type(None)`` and ``operator.getitem`` on a typing stub (how
  ``Optional[int]`` pickles) by our own narrow functions.

Any other name (``os.system``, ``builtins.eval``, ``subprocess.Popen``, ...) raises
:class:`CheckpointError` when the pickle asks for it, before anything is called. Tensor bytes are
read on demand (:meth:`TorchZipReader.tensor`), so an optimizer state beside the model costs
nothing, and shapes can be checked before any weight is read.

Examples:
    >>> with TorchZipReader("checkpoint.pt") as reader:           # doctest: +SKIP
    ...     ckpt = read_fairseq_checkpoint(reader)
    ...     ckpt.model_args["encoder_layers"], ckpt.state["encoder.linear.weight"].shape
    (12, (256, 256))
"""
from __future__ import annotations

import _compat_pickle
import argparse
import io
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from echostream.errors import EchoStreamError


class CheckpointError(EchoStreamError):
    """A checkpoint file that cannot be read safely or is not what it should be (one line)."""


# ---- references to tensor data ---------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in set(_STORAGE_DTYPES.values())}


@dataclass(frozen=True)
class _StorageType:
    """What ``torch.FloatStorage`` etc. resolve to: a marker carrying the element dtype."""

    name: str
    dtype: torch.dtype


@dataclass(frozen=True)
class StorageRef:
    """One storage record ``data/<key>`` of ``numel`` elements of ``dtype``.

    Examples:
        >>> StorageRef("0", torch.float16, 12).nbytes
        24
    """

    key: str
    dtype: torch.dtype
    numel: int

    @property
    def nbytes(self) -> int:
        return self.numel * _element_size(self.dtype)


@dataclass(frozen=True)
class TensorRef:
    """A tensor view ``shape``/``stride``/``offset`` (in elements of ``dtype``) into a storage.

    Examples:
        >>> ref = TensorRef(StorageRef("0", torch.float32, 12), torch.float32, 0, (3, 4), (4, 1))
        >>> ref.numel, ref.same_view(ref)
        (12, True)
    """

    storage: StorageRef
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def same_view(self, other: "TensorRef") -> bool:
        """True if both are the same memory (a tied weight saved twice)."""
        return (self.storage.key, self.dtype, self.offset, self.shape, self.stride) == \
            (other.storage.key, other.dtype, other.offset, other.shape, other.stride)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise CheckpointError(f"tensor {what} expected a tuple of non-negative ints, got {value!r}")
    return value


def _tensor_ref(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None,
                metadata: Any) -> TensorRef:
    """Validate the arguments of a tensor rebuild call -> a :class:`TensorRef` (no data read)."""
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"tensor storage expected a storage record, got {type(storage).__name__}")
    if type(offset) is not int or offset < 0:
        raise CheckpointError(f"tensor storage offset expected a non-negative int, got {offset!r}")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise CheckpointError(f"tensor size {shape} and stride {strides} differ in length")
    if metadata:  # conj/neg bits: never in a state dict
        raise CheckpointError(f"tensor metadata {metadata!r} is not supported")
    dtype = dtype or storage.dtype
    ref = TensorRef(storage, dtype, offset, shape, strides)
    if ref.numel:
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
        capacity = storage.nbytes // _element_size(dtype)
        if last >= capacity:
            raise CheckpointError(f"tensor {list(shape)} at offset {offset} reads past the end of "
                                  f"storage {storage.key} ({capacity} elements)")
    return ref


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> TensorRef:
    return _tensor_ref(storage, storage_offset, size, stride, None, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None) -> TensorRef:
    if not isinstance(dtype, torch.dtype) or dtype not in _TORCH_DTYPES.values():
        raise CheckpointError(f"tensor dtype {dtype!r} is not supported")
    return _tensor_ref(storage, storage_offset, size, stride, dtype, metadata)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise CheckpointError(f"parameter data expected a tensor, got {type(data).__name__}")
    return data


# ---- stubs for configuration classes ---------------------------------------------------------------


class PickledObject:
    """An object of a class we do not import: records its constructor arguments, pickled state and
    items; never runs anything of the original class. ``module``/``name`` say what it was.

    Examples:
        >>> node = stub_class("omegaconf.nodes", "AnyNode")()
        >>> node.__setstate__({"_val": 12, "_metadata": None})
        >>> to_plain(node)
        12
    """

    module = ""
    name = ""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, elements=[])
        return obj

    def __init__(self, *args, **kwargs):  # REDUCE calls cls(*args): __new__ recorded them
        pass

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.elements.append(value)

    def extend(self, values):
        self.elements.extend(values)

    def __repr__(self) -> str:
        return f"<pickled {self.module}.{self.name}>"


_STUB_CLASSES: dict[tuple[str, str], type] = {}


def stub_class(module: str, name: str) -> type:
    """The (cached) :class:`PickledObject` subclass standing for ``module.name``."""
    key = (module, name)
    if key not in _STUB_CLASSES:
        safe = re.sub(r"\W", "_", name) or "Stub"
        _STUB_CLASSES[key] = type(safe, (PickledObject,), {"module": module, "name": name})
    return _STUB_CLASSES[key]


# ---- the restricted unpickler ---------------------------------------------------------------------


def _safe_bytes(*args):
    """``bytes`` without ``bytes(n)`` (which would allocate n bytes the file does not hold)."""
    if args and isinstance(args[0], int):
        raise CheckpointError("refusing bytes(<int>) in the pickle")
    return bytes(*args)


def _safe_bytearray(*args):
    if args and isinstance(args[0], int):
        raise CheckpointError("refusing bytearray(<int>) in the pickle")
    return bytearray(*args)


def _latin1_bytes(text, encoding="latin1"):
    """``_codecs.encode(str, "latin1")``: how protocol-2 pickles spell a ``bytes`` object."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _type_of(*args):
    """``builtins.type``, for the one use a config pickle has: ``type(None)`` (``Optional[...]``);
    never the three-argument form that makes a class."""
    if args != (None,):
        raise CheckpointError(f"refusing builtins.type({', '.join(type(a).__name__ for a in args)})")
    return type(None)


def _subscript(origin, args):
    """``operator.getitem`` as typing's pickles use it (``typing.Optional[int]``): only on a
    stubbed typing class, giving a stub that records the arguments."""
    if not (isinstance(origin, type) and issubclass(origin, PickledObject) and origin.module == "typing"):
        raise CheckpointError(f"refusing operator.getitem on {type(origin).__name__}")
    return origin(args)


class PlainDict(dict):
    """What ``OrderedDict`` / ``defaultdict`` unpickle to: a dict. Pickled attributes (a module
    state dict's ``_metadata``) are kept aside in ``pickled_state``; a default factory is dropped,
    never called.

    Examples:
        >>> PlainDict(list), PlainDict([("a", 1)])
        ({}, {'a': 1})
    """

    def __init__(self, *args):
        if args and not isinstance(args[0], (dict, list, tuple)):
            args = ()  # defaultdict(factory)
        super().__init__(*args)

    def __setstate__(self, state):
        self.__dict__["pickled_state"] = state


_BUILTINS = {
    "dict": dict, "list": list, "tuple": tuple, "set": set, "frozenset": frozenset, "int": int,
    "float": float, "str": str, "bytes": _safe_bytes, "bytearray": _safe_bytearray, "bool": bool,
    "complex": complex, "slice": slice,
}
_TORCH_FUNCTIONS = {
    "_rebuild_tensor_v2": _rebuild_tensor_v2, "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter, "_rebuild_parameter_with_state": _rebuild_parameter,
}
# Configuration classes: omegaconf's nodes, fairseq's dataclass configs and enums, typing's
# annotations, and the config classes of StreamSpeech's fairseq plugins (its --user-dir packages).
_STUB_MODULES = ("omegaconf", "fairseq", "typing", "enum", "ctc_unity", "chunk_unity", "uni_unity",
                 "researches")
_NUMPY_NAMES = {("numpy", "dtype"), ("numpy", "ndarray"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}


def _compat_name(module: str, name: str) -> tuple[str, str]:
    """Python 2 names in protocol <= 2 pickles (``__builtin__.long``) -> Python 3 names."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def resolve_global(module: str, name: str) -> Any:
    """The object the allow-list gives ``module.name``; :class:`CheckpointError` for anything else."""
    module, name = _compat_name(module, name)
    if module == "builtins" and name in _BUILTINS:
        return _BUILTINS[name]
    if module == "collections" and name in ("OrderedDict", "defaultdict"):
        return PlainDict
    if module == "_codecs" and name == "encode":
        return _latin1_bytes
    if module == "builtins" and name == "type":
        return _type_of
    if module in ("_operator", "operator") and name == "getitem":
        return _subscript
    if module == "argparse" and name == "Namespace":
        return argparse.Namespace
    if module == "torch._utils" and name in _TORCH_FUNCTIONS:
        return _TORCH_FUNCTIONS[name]
    if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageType(name, _STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
        return _TORCH_DTYPES[name]
    if module.split(".")[0] in _STUB_MODULES or (module, name) in _NUMPY_NAMES:
        return stub_class(module, name)
    raise CheckpointError(f"refusing to load {module}.{name}: not a tensor, plain data or "
                          "configuration class")


class RestrictedUnpickler(pickle.Unpickler):
    r"""``pickle.Unpickler`` whose every global goes through :func:`resolve_global` and whose
    persistent ids become :class:`StorageRef` records (see the module docstring).

    Examples:
        >>> import io, pickle
        >>> RestrictedUnpickler(io.BytesIO(pickle.dumps({"a": (1, 2.5)}))).load()
        {'a': (1, 2.5)}
        >>> RestrictedUnpickler(io.BytesIO(b"cos\nsystem\n(S'true'\ntR.")).load()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        echostream.export.fairseq_checkpoint.CheckpointError: refusing to load os.system: ...
    """

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise CheckpointError(f"refusing a non-string global {module!r}.{name!r}")
        return resolve_global(module, name)

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise CheckpointError(f"unsupported persistent id {str(pid)[:60]!r} (not a torch storage)")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"storage type expected a torch storage class, got {storage_type!r}")
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise CheckpointError(f"bad storage record {key!r} of {numel!r} elements")
        return StorageRef(key, storage_type.dtype, numel)


# ---- the zip container -----------------------------------------------------------------------------

MAX_RECORD_BYTES = 1 << 28  # data.pkl and small records; tensor bytes live in the storage records
_UNPICKLE_ERRORS = (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
                    IndexError, KeyError, RecursionError, MemoryError, OverflowError,
                    UnicodeDecodeError, ImportError)


class TorchZipReader:
    """A ``torch.save`` zip file: :meth:`load` the pickle (tensors as :class:`TensorRef`), then
    :meth:`tensor` reads the bytes of the ones needed. Use as a context manager (keeps the file open).

    Examples:
        >>> with TorchZipReader("model.pt") as reader:          # doctest: +SKIP
        ...     top = reader.load()
        ...     weight = reader.tensor(top["model"]["encoder.linear.weight"])   # [256, 256]
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        self._swap = False
        self._cache: dict[str, bytearray] = {}

    def __enter__(self) -> "TorchZipReader":
        self._open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        self.release()

    def release(self) -> None:
        """Forget the storages read so far (a tensor already returned keeps its storage alive)."""
        self._cache.clear()

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def _open(self) -> None:
        if not self.path.is_file():
            raise self._fail("file not found")
        with open(self.path, "rb") as f:
            head = f.read(4)
        if head[:1] == b"\x80":
            raise self._fail("legacy (pre-1.6) torch serialization is not supported; re-save the "
                             "checkpoint with torch.save in torch >= 1.6")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise self._fail(f"not a torch checkpoint: not a zip archive or truncated ({exc})") from None
        pickles = [n for n in self._zip.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(pickles) != 1:
            raise self._fail(f"not a torch checkpoint: expected one <name>/data.pkl, got {pickles}")
        self._prefix = pickles[0][: -len("data.pkl")]
        order = self._record(f"{self._prefix}byteorder", optional=True) or b"little"
        if order not in (b"little", b"big"):
            raise self._fail(f"byteorder record expected 'little' or 'big', got {order[:20]!r}")
        self._swap = order.decode() != sys.byteorder

    def _record(self, name: str, optional: bool = False, size: int | None = None,
                limit: int = MAX_RECORD_BYTES) -> bytes | None:
        """One zip member. ``size``: the exact size it must declare; the declared size is checked
        before reading, so a record cannot make us allocate more than it says (or ``limit``)."""
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            if optional:
                return None
            raise self._fail(f"corrupt checkpoint: record {name} is missing") from None
        if size is not None and info.file_size != size:
            raise self._fail(f"corrupt checkpoint: {name} holds {info.file_size} bytes, expected {size}")
        if size is None and info.file_size > limit:
            raise self._fail(f"{name} declares {info.file_size} bytes, expected at most {limit}")
        try:
            return self._zip.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
            raise self._fail(f"corrupt checkpoint: cannot read {name} ({exc})") from None

    def load(self) -> Any:
        """Unpickle ``data.pkl`` with :class:`RestrictedUnpickler` (tensors as references)."""
        data = self._record(f"{self._prefix}data.pkl")
        try:
            return RestrictedUnpickler(io.BytesIO(data)).load()
        except CheckpointError as exc:
            raise self._fail(str(exc)) from None
        except _UNPICKLE_ERRORS as exc:
            raise self._fail(f"corrupt pickle data.pkl ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None

    def _storage(self, ref: StorageRef) -> bytearray:
        if ref.key not in self._cache:
            raw = self._record(f"{self._prefix}data/{ref.key}", size=ref.nbytes)
            if len(raw) != ref.nbytes:
                raise self._fail(f"corrupt checkpoint: storage {ref.key} holds {len(raw)} bytes, "
                                 f"expected {ref.nbytes}")
            size = _element_size(ref.dtype)
            if self._swap and size > 1:  # big-endian file: reverse each element's bytes
                raw = np.frombuffer(raw, np.uint8).reshape(-1, size)[:, ::-1].tobytes()
            self._cache[ref.key] = bytearray(raw)
        return self._cache[ref.key]

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        """The tensor a reference points to (a view of its storage: tied keys share memory)."""
        raw = self._storage(ref.storage)
        if len(raw) == 0:
            return torch.empty(ref.shape, dtype=ref.dtype)
        flat = torch.frombuffer(raw, dtype=torch.uint8)
        flat = flat[: len(raw) - len(raw) % _element_size(ref.dtype)].view(ref.dtype)
        return flat.as_strided(ref.shape, ref.stride, ref.offset)


# ---- plain data ------------------------------------------------------------------------------------


def _numpy_scalar(obj: PickledObject) -> Any:
    """``numpy.core.multiarray.scalar(dtype, bytes)`` -> the Python number (numeric kinds only)."""
    dtype, data = (obj.args + (None, None))[:2]
    if isinstance(dtype, PickledObject) and dtype.args and isinstance(data, bytes):
        try:
            kind = np.dtype(str(dtype.args[0])[:16])
        except (TypeError, ValueError):
            return repr(obj)
        if kind.kind in "biufc" and len(data) == kind.itemsize:
            return np.frombuffer(data, kind)[0].item()
    return repr(obj)


def _stub_to_plain(obj: PickledObject, depth: int) -> Any:
    """omegaconf containers -> their content; value nodes -> their value; an enum member
    (``cls(value)``) -> its value; any other object -> its pickled state."""
    if obj.name == "scalar" and obj.module.startswith("numpy"):
        return _numpy_scalar(obj)
    state = obj.state
    if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
        state = {**(state[0] or {}), **state[1]}  # (dict state, slot state)
    if isinstance(state, dict):
        if "_content" in state:
            return to_plain(state["_content"], depth)
        if "_val" in state:
            return to_plain(state["_val"], depth)
        return {str(k): to_plain(v, depth) for k, v in state.items() if not str(k).startswith("_")}
    if obj.items:
        return {str(k): to_plain(v, depth) for k, v in obj.items.items()}
    if obj.elements:
        return [to_plain(v, depth) for v in obj.elements]
    if len(obj.args) == 1 and not obj.kwargs:
        return to_plain(obj.args[0], depth)
    return repr(obj)


def to_plain(obj: Any, depth: int = 0) -> Any:
    """Pickled configuration -> dicts, lists and values (TensorRef leaves kept as they are)."""
    if depth > 100:
        raise CheckpointError("configuration nested deeper than 100 levels")
    depth += 1
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int)) else str(k)): to_plain(v, depth) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v, depth) for v in obj)
    if isinstance(obj, argparse.Namespace):
        return {k: to_plain(v, depth) for k, v in vars(obj).items()}
    if isinstance(obj, PickledObject):
        return _stub_to_plain(obj, depth)
    if isinstance(obj, type) and issubclass(obj, PickledObject):
        return f"{obj.module}.{obj.name}"
    return obj


_INTERPOLATION = re.compile(r"\$\{([\w.]+)\}")


def resolve_interpolations(value: Any, root: dict[str, Any], depth: int = 0) -> Any:
    """omegaconf's ``"${a.b}"`` (a whole-string reference into ``root``) -> the value it names."""
    match = _INTERPOLATION.fullmatch(value) if isinstance(value, str) else None
    if match is None or depth > 10:
        return value
    node: Any = root
    for part in match.group(1).split("."):
        if not isinstance(node, dict) or part not in node:
            return value
        node = node[part]
    return resolve_interpolations(node, root, depth + 1)


# ---- the fairseq layer -----------------------------------------------------------------------------


@dataclass
class FairseqCheckpoint:
    """What the importer needs from a fairseq checkpoint.

    Attributes:
        path: the file.
        state: the model state dict, key -> :class:`TensorRef` (no data read yet).
        model_args: the model's settings as a plain dict (``cfg.model`` or legacy ``args``).
        task_args: the task's settings (``cfg.task``; the same dict as ``model_args`` for ``args``).
        cfg_kind: ``"omegaconf"`` (a pickled DictConfig), ``"dict"`` (fairseq's ``to_container``) or
            ``"args"`` (a legacy argparse Namespace).

    Examples:
        >>> with TorchZipReader("streamspeech.simultaneous.fr-en.pt") as r:   # doctest: +SKIP
        ...     ckpt = read_fairseq_checkpoint(r)
        >>> ckpt.cfg_kind, ckpt.model_args["encoder_layers"]   # doctest: +SKIP
        ('dict', 12)
    """

    path: Path
    state: dict[str, TensorRef]
    model_args: dict[str, Any]
    task_args: dict[str, Any] = field(default_factory=dict)
    cfg_kind: str = "dict"


def _settings(top: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """-> (model args, task args, cfg kind) from the checkpoint's ``cfg`` or legacy ``args``."""
    cfg, args = top.get("cfg"), top.get("args")
    if cfg is not None:
        kind = "omegaconf" if isinstance(cfg, PickledObject) else "dict"
        plain = to_plain(cfg)
        if not isinstance(plain, dict) or not isinstance(plain.get("model"), dict):
            raise CheckpointError(f"{path}: not a fairseq checkpoint: cfg has no model settings")
        resolve = lambda d: {k: resolve_interpolations(v, plain) for k, v in d.items()}  # noqa: E731
        task = plain.get("task") if isinstance(plain.get("task"), dict) else {}
        return resolve(plain["model"]), resolve(task), kind
    if args is not None:
        plain = to_plain(args)
        if not isinstance(plain, dict):
            raise CheckpointError(f"{path}: not a fairseq checkpoint: args is a "
                                  f"{type(args).__name__}, expected an argparse Namespace")
        return plain, plain, "args"
    raise CheckpointError(f"{path}: not a fairseq checkpoint: no 'cfg' or 'args' entry")


def _state_dict(top: dict[str, Any], path: Path) -> dict[str, TensorRef]:
    state = top.get("model")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: not a fairseq checkpoint: no 'model' state dict")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, TensorRef)]
    if bad:
        raise CheckpointError(f"{path}: state dict entry {bad[0]!r} is not a tensor")
    return state


def read_fairseq_checkpoint(reader: TorchZipReader) -> FairseqCheckpoint:
    """Unpickle a fairseq checkpoint and pick out its state dict and settings (no tensor data read).

    Raises:
        CheckpointError: not a torch zip, corrupt, refused pickle, or not a fairseq checkpoint.
    """
    top = reader.load()
    if not isinstance(top, dict):
        raise CheckpointError(f"{reader.path}: not a fairseq checkpoint: the file holds a "
                              f"{type(top).__name__}, expected a dict")
    state = _state_dict(top, reader.path)
    model_args, task_args, kind = _settings(top, reader.path)
    return FairseqCheckpoint(reader.path, state, model_args, task_args, kind)


def read_state_dict(reader: TorchZipReader, entry: str) -> dict[str, TensorRef]:
    """The ``{entry: state_dict}`` of a plain torch checkpoint (a vocoder's ``generator``)."""
    top = reader.load()
    state = top.get(entry) if isinstance(top, dict) else None
    if not isinstance(state, dict) or not state:
        keys = sorted(map(str, top))[:5] if isinstance(top, dict) else []
        raise CheckpointError(f"{reader.path}: expected a dict with a {entry!r} state dict, got "
                              f"a {type(top).__name__} with keys {keys}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, TensorRef)]
    if bad:
        raise CheckpointError(f"{reader.path}: {entry} entry {bad[0]!r} is not a tensor")
    return state
