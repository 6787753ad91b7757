"""Device mesh, parameter sharding rules and batch placement (big_vision ``sharding.py`` style).

One mesh with two axes:

* ``"data"``: pure data parallelism (parameters replicated along it);
* ``"fsdp"``: fully-sharded data parallelism (ZeRO-3, Rajbhandari et al. 2020): each
  large parameter (and its optimizer moments and EMA copy) is split along one of its
  axes over ``"fsdp"``; XLA inserts the all-gathers / reduce-scatters.

The batch is split over both axes, ``P(("data", "fsdp"))``, so every device sees
``global_batch / device_count`` examples. Parameters follow, in order:

1. user rules ``(regex, PartitionSpec)``: the first regex that ``re.search``-matches the
   "/"-joined path of a leaf wins (so a rule for ``conv_in/kernel`` also applies to the
   Adam moments ``opt_state/.../mu/conv_in/kernel``);
2. the FSDP rule: a leaf with at least ``min_fsdp_size`` elements shards its largest axis
   divisible by the fsdp size; anything else (small leaves, scalars, no divisible axis)
   is replicated.

Multi-host: every process passes its own slice of the global batch to ``shard_batch``
(``jax.make_array_from_process_local_data``); with the mesh from ``make_mesh`` the
devices of process i hold the i-th contiguous block of the batch.
"""
from __future__ import annotations

import itertools
import re
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
Rule = Tuple[str, P]


# ------------------------------------------------------------------ mesh
def make_mesh(data: int = -1, fsdp: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A ``Mesh`` of shape (data, fsdp) with axes ("data", "fsdp").

    One of ``data`` / ``fsdp`` may be -1: all remaining devices. ``devices`` defaults to
    ``jax.devices()`` (every device of every process, process-major order).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, fsdp = int(data), int(fsdp)
    if data == -1 and fsdp == -1:
        raise ValueError("make_mesh: at most one of data / fsdp may be -1")
    if data == -1 or fsdp == -1:
        other = fsdp if data == -1 else data
        if other < 1 or n % other:
            raise ValueError(f"make_mesh: {n} devices cannot be split into a mesh with "
                             f"{'fsdp' if data == -1 else 'data'}={other}")
        data, fsdp = (n // other, other) if data == -1 else (other, n // other)
    if data < 1 or fsdp < 1:
        raise ValueError(f"make_mesh: axis sizes must be >= 1 (or -1), got data={data}, fsdp={fsdp}")
    if data * fsdp != n:
        raise ValueError(f"make_mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are {n} "
                         f"(set mesh.data / mesh.fsdp so that their product is {n}, or use -1 for one of them)")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((data, fsdp), devices=devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001  (non-TPU topologies / older signatures: plain process-major order)
        grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device: ``P(("data", "fsdp"))``."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ------------------------------------------------------------------ parameter rules
def path_str(path) -> str:
    """A tree path (tuple of keys) -> "a/b/0/c"."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_fsdp_size: int = 2 ** 18) -> P:
    """The FSDP rule for one array: its largest axis divisible by ``fsdp_size`` goes on "fsdp"
    (the first of equal ones), when the array has at least ``min_fsdp_size`` elements."""
    shape = tuple(int(s) for s in shape)
    if fsdp_size <= 1 or not shape or int(np.prod(shape)) < min_fsdp_size:
        return P()
    candidates = [i for i, s in enumerate(shape) if s % fsdp_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], -i))
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def _check_rule(path: str, spec: P, shape, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule {spec} for {path!r} has more entries than its shape {tuple(shape)}")
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        size = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
        if dim % size:
            raise ValueError(f"sharding rule {spec} for {path!r}: dimension {dim} is not divisible by {size}")


def partition_specs(tree, mesh: Mesh, min_fsdp_size: int = 2 ** 18, rules: Sequence[Rule] = ()):
    """A PartitionSpec for every array leaf of ``tree`` (arrays or ShapeDtypeStructs);
    None leaves stay None. See the module docstring for the rule order."""
    fsdp_size = mesh.shape.get("fsdp", 1)
    compiled = [(re.compile(pattern), spec if isinstance(spec, P) else P(*spec)) for pattern, spec in rules]

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        name = path_str(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                _check_rule(name, spec, shape, mesh)
                return spec
        return fsdp_spec(shape, fsdp_size, min_fsdp_size)

    return jax.tree_util.tree_map_with_path(one, tree)


def named_shardings(specs, mesh: Mesh):
    """PartitionSpec tree -> NamedSharding tree."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def tree_shardings(tree, mesh: Mesh, min_fsdp_size: int = 2 ** 18, rules: Sequence[Rule] = ()):
    """NamedSharding for every leaf of ``tree`` (the composition of the two above)."""
    return named_shardings(partition_specs(tree, mesh, min_fsdp_size, rules), mesh)


def shard_tree(tree, shardings):
    """Place a pytree of host / device arrays onto ``shardings`` (same structure).

    Every process must pass the same global values (as after a seeded init); each keeps
    only its addressable shards.
    """
    def put(x, s):
        if isinstance(x, jax.Array) and (not x.is_fully_addressable or s.is_fully_addressable):
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree_util.tree_map(put, tree, shardings)


def with_shardings(abstract_tree, shardings):
    """ShapeDtypeStructs carrying ``shardings`` (for ``jax.jit`` / orbax restore targets)."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)


# ------------------------------------------------------------------ batches
def check_batch_size(batch_size: int, mesh: Optional[Mesh], grad_accum_steps: int = 1) -> None:
    """The global batch must split into ``grad_accum_steps`` micro-batches, each spread evenly over the
    mesh's devices (batch on ``P(("data", "fsdp"))``; micro-batches are strided per device, see
    ``optim.split_microbatches``): batch % (devices x grad_accum_steps) == 0. A clear error here
    instead of XLA's sharding-shape error from inside the jitted step."""
    n = 1 if mesh is None else int(mesh.devices.size)
    k = int(grad_accum_steps)
    if batch_size % (n * k):
        where = "" if mesh is None else f" x the {n} devices of the mesh {dict(mesh.shape)} (mesh.data x mesh.fsdp)"
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of train.grad_accum_steps={k}{where} = "
                         f"{n * k}: each micro-batch is split evenly over the batch axes")


def local_batch_size(global_batch_size: int, mesh: Optional[Mesh] = None) -> int:
    """Examples each process loads: global / process_count (checked against the mesh)."""
    pc = jax.process_count()
    if global_batch_size % pc:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {pc} processes")
    if mesh is not None:
        n = mesh.devices.size
        if global_batch_size % n:
            raise ValueError(f"global batch {global_batch_size} is not divisible by the {n} devices of the mesh "
                             f"(batch axis {BATCH_AXES})")
    return global_batch_size // pc


def shard_batch(batch, mesh: Mesh, sharding: Union[NamedSharding, None] = None):
    """Process-local numpy arrays (leading axis = this process's examples) -> global
    ``jax.Array``s on ``P(("data", "fsdp"))``. Non-array leaves (strings) are dropped
    by the caller; here every leaf must be numeric."""
    sharding = sharding or batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        if x.dtype.kind in "USO":
            raise TypeError(f"shard_batch: cannot place {x.dtype} data on devices; tokenize / drop it first")
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map(put, batch)


def gather_to_host(tree):
    """Fully replicated numpy copies of (possibly sharded, multi-process) arrays.

    A collective: every process must call it. Costs a full copy per host; use for
    small trees (tests, metrics), not for saving large models (use the checkpoint).
    """
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(get, tree)


# ------------------------------------------------------------------ multi-process
_BARRIER_IDS = itertools.count()


def sync_processes(tag: str, timeout_s: float = 3600.0) -> None:
    """A barrier over all processes through the coordination service (as orbax's barriers;
    no device collective, so it waits up to ``timeout_s``). No-op with one process. Every
    process must call it the same number of times in the same order."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    client = distributed.global_state.client
    if client is not None:
        client.wait_at_barrier(f"ldm_jax_{tag}_{next(_BARRIER_IDS)}", timeout_in_ms=int(timeout_s * 1000))


class SyncedJit:
    """A ``jax.jit``-ed function that, with several processes, compiles each new input
    signature ahead of running it and then meets the other processes at a barrier.

    Why: the first cross-process collective of a program creates its CPU (gloo)
    communicators, and a process that is still compiling 30 s after its peer started
    waiting makes that peer fail ("Gloo context initialization failed ... GetKeyValue()
    timed out"). On a loaded machine, or when one process hits the compilation cache that
    another misses, compile times differ by more than that. Compiling first moves the
    wait into the barrier. The call then reuses the compiled executable. With one
    process this is the plain jitted call.
    """

    def __init__(self, jitted, name: str = "jit"):
        self._jitted = jitted
        self._name = name
        self._seen = set()

    @staticmethod
    def _signature(args, kwargs):
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        return treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x).__name__)),
                               str(getattr(x, "sharding", ""))) for x in leaves)

    def __call__(self, *args, **kwargs):
        if jax.process_count() > 1:
            signature = self._signature(args, kwargs)
            if signature not in self._seen:
                self._jitted.lower(*args, **kwargs).compile()
                sync_processes(f"{self._name}_compiled")
                self._seen.add(signature)
        return self._jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._jitted.lower(*args, **kwargs)
