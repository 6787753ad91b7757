"""Reading PyTorch weight files into numpy, without torch and without running code.

* safetensors: parsed directly (8-byte header length, JSON header, raw
  little-endian buffers), so bfloat16 works (via ml_dtypes) and a truncated
  file is reported precisely.
* ``torch.save`` files (zip archives and legacy pickles): read by the restricted
  unpickler in ``torch_pickle`` that only rebuilds tensors.
* sharded checkpoints: ``*.index.json`` with a ``weight_map``.

Which of the first two a file is comes from its content (``weight_format``), not its name:
renamed files (a safetensors file called ``.bin`` / ``.SAFETENSORS`` / no suffix, a torch
archive called ``.safetensors``) are common, and torch.load / safetensors read them by content too.
"""
from __future__ import annotations

import json
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, Optional

import ml_dtypes
import numpy as np

from ldm_jax.convert.errors import CheckpointError

StateDict = Dict[str, np.ndarray]

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


def read_safetensors(path: str) -> StateDict:
    """All tensors of a .safetensors file as numpy arrays: read-only views on the memory-mapped file
    (copy them, or place them with ``place_params``, before overwriting that file in place)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: not a safetensors file or truncated: header claims {header_len} bytes, "
                f"file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
        # Map the file instead of reading it: the tensors are read-only views that are paged in when
        # they are copied (to the device, or cast), so a 3-4 GB checkpoint is not first copied to memory.
        data = memoryview(_map_readonly(f, size))[8 + header_len:] if size > 8 + header_len else b""
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    out: StateDict = {}
    for key, info in header.items():
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: malformed safetensors header entry for {key!r}")
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
        try:
            start, end = (int(v) for v in info["data_offsets"])
            shape = tuple(int(n) for n in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed safetensors header entry for {key!r}") from None
        count = int(np.prod(shape, dtype=np.int64))
        if min(shape, default=0) < 0 or start < 0 or end - start != count * np.dtype(dtype).itemsize:
            raise CheckpointError(
                f"{path}: tensor {key!r} of shape {shape} and dtype {info['dtype']} cannot occupy "
                f"bytes {start}..{end}; the header is corrupt")
        if end > len(data):
            raise CheckpointError(
                f"{path}: truncated: tensor {key!r} needs bytes {start}..{end} of the data section, "
                f"which has only {len(data)}")
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=start)
        out[key] = arr.reshape(shape)
    return out


def _map_readonly(f, size: int):
    """The whole file as a read-only buffer (mmap; a plain read where mapping is not possible)."""
    import mmap

    try:
        return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        f.seek(0)
        return f.read()


def place_params(tree):
    """Converted parameters (numpy, possibly read-only views on a memory-mapped weight file) as
    device arrays that own their memory, in one batched transfer (a ``jnp.asarray`` per leaf
    would dispatch an op per leaf).

    On a CPU backend ``device_put`` adopts 64-byte aligned host buffers instead of copying them
    (``may_alias=False`` does not change that for numpy inputs), mapped file pages included: the
    parameters would then change when the file is overwritten. It copies everything else itself,
    slowly for the strided (transposed) views conversion makes. So on CPU every leaf that does not
    own its memory is copied here once, contiguous, into a fresh 64-byte aligned buffer that XLA
    adopts: one copy per leaf instead of two (numpy's, then XLA's). Accelerators copy to their own
    memory anyway; the strided views are made contiguous by numpy first there too.

    The copies run on a thread pool (numpy releases the GIL while copying): they are bound by page
    faults (reading the mapped file, touching fresh memory) and strided reads, which several cores
    serve in parallel. Measured at SD1.5 shapes (4 GB float32) on the 2-core CPU machine: 13.3 s
    serial, 6.1 s on two threads."""
    import jax

    if jax.default_backend() == "cpu":
        prepare = lambda a: _aligned_copy(a) if _is_view(a) else a  # noqa: E731
    else:
        prepare = lambda a: np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    with ThreadPoolExecutor(max_workers=_COPY_THREADS) as pool:
        leaves = list(pool.map(prepare, leaves))
    return jax.device_put(jax.tree_util.tree_unflatten(treedef, leaves))


_COPY_THREADS = max(1, min(8, os.cpu_count() or 1))  # beyond ~8 the copies are memory-bandwidth bound


_XLA_CPU_ALIGNMENT = 64  # the alignment at which XLA:CPU adopts a host buffer rather than copying it


def _is_view(a) -> bool:
    return isinstance(a, np.ndarray) and not a.flags.owndata


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``a`` in a fresh buffer aligned to ``_XLA_CPU_ALIGNMENT`` bytes."""
    raw = np.empty(a.nbytes + _XLA_CPU_ALIGNMENT, np.uint8)
    start = (-raw.ctypes.data) % _XLA_CPU_ALIGNMENT
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    np.copyto(out, a)
    return out


# safetensors: u64 little-endian header size, then the JSON header, which starts with "{" (the format's
# rule). Header sizes above this are refused by the safetensors library too (100 MB, MAX_HEADER_SIZE).
_SAFETENSORS_MAX_HEADER = 100_000_000


def weight_format(path: str) -> str:
    """The format of a weight file from its first bytes, whatever its name: "safetensors", or "torch"
    (a ``torch.save`` zip archive or legacy pickle); a CheckpointError naming the file when it is
    neither. Nothing in the file is run (a pickle is only recognised by its first byte here)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    # Safetensors first: its 8-byte size may itself start with 0x80 (a pickle's PROTO opcode), while a
    # zip (compression method) or a torch legacy pickle (its magic number) never has "{" at offset 8.
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= _SAFETENSORS_MAX_HEADER:
        return "safetensors"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06") or head[:1] == b"\x80" or head[257:262] == b"ustar":
        return "torch"  # torch_pickle reports the unsupported ones (tar archives, plain pickles) itself
    raise CheckpointError(f"{path}: not a weight file: neither safetensors (8-byte header size, then a JSON "
                          f"header) nor a torch.save archive or pickle ({os.path.getsize(path)} bytes, starting "
                          f"{head[:12]!r})")


def read_state_dict(path: str) -> StateDict:
    """Tensors of one weight file: safetensors or a torch.save file (whatever its name: see
    ``weight_format``), or a sharded ``*.index.json``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if re.search(r"\.index(\.[^./]+)?\.json$", path):  # also the variant form ".index.fp16.json"
        return _read_sharded(path)
    if weight_format(path) == "safetensors":
        return read_safetensors(path)
    from ldm_jax.convert.torch_pickle import load_torch_pickle

    state = load_torch_pickle(path)
    return unwrap_state_dict(state, path)


def unwrap_state_dict(obj, path: str) -> StateDict:
    """Accept a plain state dict or the usual ``{"state_dict": ...}`` wrapper."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    out = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if not out:
        raise CheckpointError(f"{path}: holds no tensors")
    return out


def _read_sharded(index_path: str) -> StateDict:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: no 'weight_map' in the index")
    folder = os.path.dirname(index_path)
    out: StateDict = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: shard name {shard!r} is not a file in its folder")
        out.update(read_state_dict(os.path.join(folder, shard)))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise CheckpointError(f"{index_path}: shards lack {len(missing)} indexed tensors, e.g. {missing[:3]}")
    return out


def find_weights(folder: str, stems: Iterable[str], variant: Optional[str] = None) -> str:
    """The weight file of a diffusers/transformers component folder.

    Looks for safetensors before ``.bin`` files, single files and sharded indexes
    (``STEM.safetensors.index[.variant].json``, the diffusers/transformers variant naming, then
    the legacy ``STEM.safetensors.variant.index.json`` that diffusers still reads) in the order of
    the library that wrote the folder (``weight_file_names``).
    A folder that only holds other variants (``STEM.fp16.safetensors`` with no
    ``STEM.safetensors``) is an error that names them and the ``variant=`` to pass, as diffusers
    and transformers refuse to load it without that argument too.
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a directory")
    tried = []
    stems = list(stems)
    for name in weight_file_names(stems, variant):
        candidate = os.path.join(folder, name)
        tried.append(name)
        if os.path.isfile(candidate):
            return candidate
    hints = []
    for name in tried:  # a dangling symlink (e.g. a Hugging Face cache snapshot whose blob is gone)
        candidate = os.path.join(folder, name)
        if os.path.islink(candidate):
            hints.append(f"{name} is a broken link to {os.readlink(candidate)}")
    found = available_variants(folder, stems)
    if found:
        choices = ", ".join("variant=None" if v is None else f"variant={v!r}" for v in sorted(found, key=str))
        hints.append(f"the folder holds {', '.join(sorted(f for v in found.values() for f in v))}: "
                     f"load it with {choices}")
    raise CheckpointError(f"{folder}: no weight file found (looked for {', '.join(tried)})"
                          + "".join(f"; {h}" for h in hints))


# The stem diffusers' ModelMixin saves under; transformers uses "model" (safetensors) / "pytorch_model" (.bin).
DIFFUSERS_WEIGHT_STEM = "diffusion_pytorch_model"


def weight_file_names(stems: Iterable[str], variant: Optional[str] = None) -> list:
    """Candidate weight file names, most preferred first (see ``find_weights``), in the order of the
    library that reads each stem, so that a folder holding several copies loads the one the reference
    loads: diffusers' ``ModelMixin.from_pretrained`` takes a sharded safetensors index before the single
    files (``_fetch_index_file`` runs first), transformers' ``from_pretrained`` the single
    ``model.safetensors`` before its index, both before pickled ``.bin`` files."""
    v = f".{variant}" if variant else ""
    names = []
    for stem in stems:
        single = [f"{stem}{v}.safetensors"]
        index = [f"{stem}.safetensors.index{v}.json"]
        bin_index = [f"{stem}.bin.index{v}.json"]
        if variant:  # diffusers' _fetch_index_file_legacy: the variant before ".index.json"
            index.append(f"{stem}.safetensors{v}.index.json")
            bin_index.append(f"{stem}.bin{v}.index.json")
        first = index + single if stem == DIFFUSERS_WEIGHT_STEM else single + index
        names += first + [f"{stem}{v}.bin"] + bin_index
    return names


_VARIANT_FILE = re.compile(r"^(?P<stem>[^.]+?)(?:\.(?P<v1>[^.]+?))?(?P<shard>-\d+-of-\d+)?(?:\.(?P<v2>[^.]+))?"
                           r"\.(?:safetensors|bin)$")
_VARIANT_INDEX = re.compile(r"^(?P<stem>[^.]+)\.(?:safetensors|bin)(?:\.(?P<v1>[^.]+))?\.index(?:\.(?P<v2>[^.]+))?"
                            r"\.json$")


def available_variants(folder: str, stems: Iterable[str]) -> Dict[Optional[str], list]:
    """Variant name (None: the plain files) -> the weight files of that variant in ``folder``:
    ``STEM.VARIANT.safetensors``/``.bin``, sharded ``STEM.VARIANT-00001-of-00002.safetensors`` and
    their indexes ``STEM.safetensors.index.VARIANT.json`` (or the legacy ``STEM.safetensors.VARIANT.index.json``)."""
    stems = set(stems)
    out: Dict[Optional[str], list] = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return out
    for name in names:
        m = _VARIANT_INDEX.match(name) or _VARIANT_FILE.match(name)
        if (m is None or m.group("stem") not in stems or m.groupdict().get("shard")
                or not os.path.isfile(os.path.join(folder, name))):
            continue  # shards are listed by their index
        variant = m.group("v2") or m.group("v1")
        out.setdefault(variant, []).append(name)
    return out


def weight_files(folder: str, stems: Iterable[str]) -> list:
    """Every weight file of ``stems`` in ``folder``, in any layout a loader may pick (see
    ``find_weights``): single files and shards of every variant (``STEM[.VARIANT][-00001-of-00002]
    [.VARIANT].safetensors`` / ``.bin``), sharded indexes (``STEM.safetensors.index[.VARIANT].json``,
    legacy ``STEM.safetensors.VARIANT.index.json``), and the files those indexes name in ``folder``
    whatever their names. Sorted names; sub-folders and other files are not listed."""
    stems = set(stems)
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []

    def plain(name):  # a file or a link, not a folder
        path = os.path.join(folder, name)
        return os.path.islink(path) or not os.path.isdir(path)

    found = set()
    for name in filter(plain, names):
        index = _VARIANT_INDEX.match(name)
        m = index or _VARIANT_FILE.match(name)
        if m is None or m.group("stem") not in stems:
            continue
        found.add(name)
        if index is None:
            continue
        try:  # the shards this index names (an unreadable index names none)
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
        except (OSError, ValueError, AttributeError):
            continue
        shards = weight_map.values() if isinstance(weight_map, dict) else ()
        found.update(shard for shard in shards if isinstance(shard, str) and shard in names and plain(shard)
                     and shard.endswith((".safetensors", ".bin")))
    return sorted(found)


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
