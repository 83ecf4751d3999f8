"""A restricted unpickler for FLAME-format model files.

FLAME's `.pkl` files (and `np.save`d dicts such as DECA's `landmark_embedding.npy`) are
pickles, and a plain `pickle.load` runs whatever callable the file names. This module
loads them with an allow-list instead:

* numpy array/dtype/scalar reconstruction (old `numpy.core` and new `numpy._core` paths);
* `scipy.sparse` csc/csr/coo matrices, mapped to `SparseStub` (records its state only);
* every `chumpy.*` class, mapped to `ChumpyStub` (records its state; the array is `state["x"]`);
* torch tensors inside `np.save`d dicts (DECA), rebuilt with `torch.load(weights_only=True)`;
* a few inert builtins (`set`, `object`, `collections.OrderedDict`, ...).

Any other global (e.g. `os.system`, `builtins.eval`) raises `AssetError` before anything
runs. Use `to_array(obj)` to turn a loaded value (ndarray, stub, sparse) into an ndarray.
"""

from __future__ import annotations

import codecs
import collections
import importlib
import io
import pickle
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Self

import numpy as np

from priors.errors import AssetError

__all__ = [
    "ChumpyStub",
    "SparseStub",
    "load_npy",
    "load_pickle",
    "loads_pickle",
    "to_array",
]

_PY2_MODULES = {"copy_reg": "copyreg", "__builtin__": "builtins"}
_SPARSE_NAMES = {
    "csc_matrix": "csc", "csr_matrix": "csr", "coo_matrix": "coo",
    "csc_array": "csc", "csr_array": "csr", "coo_array": "coo",
}
_INERT_BUILTINS = {
    "object", "set", "frozenset", "list", "dict", "tuple", "int", "float", "complex",
    "str", "bytes", "bytearray", "bool", "slice", "unicode", "long",
}
_FIX = "fix: use an original FLAME file (https://flame.is.tue.mpg.de) or a converted .npz"


class ChumpyStub:
    """Stands in for any chumpy class; keeps the pickled state (`state["x"]` is the array)."""

    chumpy_class = "chumpy.ch.Ch"

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        obj = super().__new__(cls)
        obj.state = {}
        obj.args = args
        return obj

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        self.state = state if isinstance(state, dict) else {"state": state}

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = to_array(self)
        return arr if dtype is None else arr.astype(dtype)

    def __repr__(self) -> str:
        return f"<{self.chumpy_class} stub, keys={sorted(self.state)}>"


class SparseStub:
    """Stands in for a pickled scipy.sparse matrix; `to_array` makes it dense."""

    sparse_format = "csc"

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        obj = super().__new__(cls)
        obj.state = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        self.state = state if isinstance(state, dict) else {}

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = to_array(self)
        return arr if dtype is None else arr.astype(dtype)

    def to_scipy(self) -> Any:
        """The matrix as a real scipy.sparse matrix (built from its arrays, no pickle code)."""
        import scipy.sparse as sp

        st = self.state
        shape = st.get("_shape", st.get("shape"))
        if shape is None:
            raise ValueError("sparse matrix without a shape")
        shape = tuple(int(s) for s in shape)
        if self.sparse_format == "coo":
            row = np.asarray(st.get("row", st.get("coords", [None, None])[0]))
            col = np.asarray(st.get("col", st.get("coords", [None, None])[1]))
            return sp.coo_matrix((np.asarray(st["data"]), (row, col)), shape=shape)
        cls = sp.csc_matrix if self.sparse_format == "csc" else sp.csr_matrix
        arrays = (np.asarray(st["data"]), np.asarray(st["indices"]), np.asarray(st["indptr"]))
        return cls(arrays, shape=shape)


def to_array(obj: Any) -> np.ndarray:
    """A loaded value as an ndarray: ndarrays as-is, chumpy stubs -> state['x'], sparse -> dense.

    Raises ValueError (the caller names the file and key) when there is no array to take.
    """
    if isinstance(obj, np.ndarray):
        return obj
    if isinstance(obj, ChumpyStub):
        if "x" not in obj.state:
            raise ValueError(
                f"{obj.chumpy_class} object holds no array (no 'x' in its state; "
                "it is a chumpy expression, not a stored value)"
            )
        return to_array(obj.state["x"])
    if isinstance(obj, SparseStub):
        return np.asarray(obj.to_scipy().toarray())
    if hasattr(obj, "toarray"):  # a real scipy.sparse matrix
        return np.asarray(obj.toarray())
    if isinstance(obj, (list, tuple, int, float, np.number)):
        return np.asarray(obj)
    raise ValueError(f"expected an array, found {type(obj).__name__}")


# ----------------------------------------------------------------------------- allow-list

def _stub_class(base: type, module: str, name: str, cache: dict) -> type:
    """A subclass of `base` named after the pickled class (so errors and reprs say which).

    Made afresh for every load (cache is per unpickler), so nothing a pickle does to the
    class (BUILD with slot state can set class attributes) outlives that load."""
    key = (base, module, name)
    if key not in cache:
        attrs: dict[str, Any] = {"__module__": __name__}
        if base is ChumpyStub:
            attrs["chumpy_class"] = f"{module}.{name}"
        else:
            attrs["sparse_format"] = _SPARSE_NAMES[name]
        cache[key] = type(f"{name}Stub", (base,), attrs)
    return cache[key]


def _numpy_attr(submodule: str, name: str) -> Any:
    """numpy.<_core|core>.<submodule>.<name>, whichever this numpy has."""
    for pkg in ("numpy._core", "numpy.core"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(f"{pkg}.{submodule}")
            return getattr(mod, name)
        except (ImportError, AttributeError):
            continue
    raise AttributeError(f"numpy has no {submodule}.{name}")


def _safe_codecs_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as Python 3 protocol-2 pickles use it for bytes: str -> bytes only."""
    if not isinstance(text, str) or codecs.lookup(encoding).name not in ("iso8859-1", "utf-8"):
        raise pickle.UnpicklingError("_codecs.encode used for something other than bytes")
    return codecs.encode(text, encoding, errors)


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor limited to our stub classes on `object` (Python 2 pickles)."""
    if base is object and isinstance(cls, type) and issubclass(cls, (ChumpyStub, SparseStub)):
        return cls.__new__(cls)
    raise pickle.UnpicklingError("copy_reg._reconstructor used on a class outside the allow-list")


def _safe_load_storage(data: Any) -> Any:
    """torch.storage._load_from_bytes, but through torch's own weights-only unpickler."""
    import torch

    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("torch storage without bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError("torch storage bytes did not hold a storage")
    return storage


def _safe_rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any,
                         requires_grad: Any = False, hooks: Any = None,
                         metadata: Any = None) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 -> a numpy copy of the tensor (no torch object escapes)."""
    import torch

    ints = isinstance(offset, int) and all(
        isinstance(v, int) for v in (*tuple(size), *tuple(stride)))
    if not ints or not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError("unexpected arguments to a torch tensor rebuild")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dtype = storage.dtype if isinstance(storage, torch.storage.TypedStorage) else torch.uint8
        t = torch.empty(0, dtype=dtype).set_(storage, int(offset), tuple(size), tuple(stride))
    return t.detach().cpu().numpy().copy()


def _build_allow_list() -> dict[tuple[str, str], Any]:
    allow: dict[tuple[str, str], Any] = {}
    reconstruct = _numpy_attr("multiarray", "_reconstruct")
    scalar = _numpy_attr("multiarray", "scalar")
    frombuffer = _numpy_attr("numeric", "_frombuffer")
    for pkg in ("numpy.core", "numpy._core"):
        allow[(f"{pkg}.multiarray", "_reconstruct")] = reconstruct
        allow[(f"{pkg}.multiarray", "scalar")] = scalar
        allow[(f"{pkg}.numeric", "_frombuffer")] = frombuffer
    allow[("numpy", "ndarray")] = np.ndarray
    allow[("numpy", "dtype")] = np.dtype
    for dt in ("float64", "float32", "int64", "int32", "uint32", "uint8", "bool_"):
        allow[("numpy", dt)] = getattr(np, dt)
    allow[("_codecs", "encode")] = _safe_codecs_encode
    allow[("copyreg", "_reconstructor")] = _safe_reconstructor
    allow[("collections", "OrderedDict")] = collections.OrderedDict
    allow[("torch._utils", "_rebuild_tensor_v2")] = _safe_rebuild_tensor
    allow[("torch._utils", "_rebuild_tensor")] = _safe_rebuild_tensor
    allow[("torch.storage", "_load_from_bytes")] = _safe_load_storage
    for name in _INERT_BUILTINS:
        target = {"unicode": "str", "long": "int"}.get(name, name)
        allow[("builtins", name)] = getattr(__import__("builtins"), target)
    return allow


_ALLOW: dict[tuple[str, str], Any] | None = None


def _allowed(module: str, name: str, stubs: dict) -> Any | None:
    global _ALLOW
    if _ALLOW is None:
        _ALLOW = _build_allow_list()
    module = _PY2_MODULES.get(module, module)
    if (module, name) in _ALLOW:
        return _ALLOW[(module, name)]
    if module == "chumpy" or module.startswith("chumpy."):
        return _stub_class(ChumpyStub, module, name, stubs)
    if (module == "scipy.sparse" or module.startswith("scipy.sparse.")) and name in _SPARSE_NAMES:
        return _stub_class(SparseStub, module, name, stubs)
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, label: str) -> None:
        super().__init__(file, encoding="latin1")
        self._label = label
        self._stubs: dict = {}

    def find_class(self, module: str, name: str) -> Any:
        found = _allowed(module, name, self._stubs)
        if found is None:
            raise AssetError(
                f"{self._label}: refuses to load: the pickle names {module}.{name}, which is "
                f"not a model array; the file may be tampered with or is not a model file; {_FIX}"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise AssetError(
            f"{self._label}: refuses to load: the pickle uses persistent ids (a torch.save "
            f"archive?), which is not a model-array pickle; {_FIX}"
        )


def _unpickle(file: BinaryIO, label: str) -> Any:
    try:
        return _RestrictedUnpickler(file, label).load()
    except AssetError:
        raise
    except MemoryError as exc:
        raise AssetError(f"{label}: corrupt pickle (asks for too much memory); "
                         "fix: re-download or re-copy the file") from exc
    except Exception as exc:  # EOFError, UnpicklingError, ValueError, struct errors, ...
        raise AssetError(
            f"{label}: truncated or corrupt pickle ({type(exc).__name__}: {_short(exc)}); "
            "fix: re-download or re-copy the file"
        ) from exc


def _short(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ").strip()
    return text[:120] + ("..." if len(text) > 120 else "")


def load_pickle(path: str | Path) -> Any:
    """Load a pickle through the allow-list (latin1, so Python 2 FLAME files load too).

    Raises AssetError (one line naming the file) if it is missing, names a global outside the
    allow-list, or is truncated/corrupt.
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            return _unpickle(fh, str(p))
    except OSError as exc:
        raise AssetError(f"{p}: cannot read ({exc.strerror}); fix: check the path") from exc


def loads_pickle(data: bytes, label: str = "<bytes>") -> Any:
    """`load_pickle` for bytes already in memory; `label` names the source in errors."""
    return _unpickle(io.BytesIO(data), label)


def load_npy(path: str | Path) -> Any:
    """Load a `.npy` file; object arrays (np.save of a dict) go through the allow-list.

    Returns the ndarray, or for a 0-d object array its single item (e.g. the dict).
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            return _read_npy(fh, str(p))
    except OSError as exc:
        raise AssetError(f"{p}: cannot read ({exc.strerror}); fix: check the path") from exc


def _read_npy(fh: BinaryIO, label: str) -> Any:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        dtype = read_header(fh)[2]
    except Exception as exc:
        raise AssetError(f"{label}: not a valid .npy file ({_short(exc)}); "
                         "fix: re-download or re-copy the file") from exc
    if not dtype.hasobject:
        fh.seek(0)
        try:
            return fmt.read_array(fh, allow_pickle=False)
        except Exception as exc:
            raise AssetError(f"{label}: truncated or corrupt .npy ({_short(exc)}); "
                             "fix: re-download or re-copy the file") from exc
    arr = _unpickle(fh, label)
    if not isinstance(arr, np.ndarray):
        raise AssetError(f"{label}: the .npy pickle does not hold an array; "
                         "fix: re-download or re-copy the file")
    return arr.item() if arr.shape == () else arr

