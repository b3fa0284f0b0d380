"""Device meshes, logical axis names for every parameter, and the one table that maps them onto the mesh.

Mesh axes: ``data`` (batch), ``fsdp`` (batch, and parameters sharded along d_model), ``tensor`` (attention
heads, the FFN hidden dimension and the vocabulary). Every parameter gets a tuple of logical names from its
key and rank; ``LOGICAL_RULES`` maps each logical name to a mesh axis (or None = replicated). A dimension that
does not divide by its mesh axis size is replicated instead, so one model runs on any mesh.
"""

import math
import os

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attn_jax import hosts

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "positions": None,
    "hidden": None,
}

# Logical names of each parameter, by its key in the core's parameter dicts (before any leading layer axis).
_PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embedding": ("vocab", "embed"),
    "positions": ("positions", "embed"),
    "w_q": ("embed", "heads", "head_dim"),
    "w_k": ("embed", "kv_heads", "head_dim"),
    "w_v": ("embed", "kv_heads", "head_dim"),
    "w_o": ("heads", "head_dim", "embed"),
    "b_q": ("heads", "head_dim"),
    "b_k": ("kv_heads", "head_dim"),
    "b_v": ("kv_heads", "head_dim"),
    "b_o": ("embed",),
    "w_1": ("embed", "mlp"),
    "b_1": ("mlp",),
    "w_2": ("mlp", "embed"),
    "b_2": ("embed",),
    "scale": ("embed",),
    "bias": ("embed",),
}
# The recurrent families' parameters (attn_jax.rnn), by the last keys of their path: the embedding tables and
# the readout's vocabulary axis split as the Transformer's do; GRU and alignment weights stay replicated.
_RECURRENT_PARAM_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("source_embedding",): ("vocab", "embed"),
    ("target_embedding",): ("vocab", "embed"),
    ("readout", "w_o"): ("hidden", "vocab"),
    ("readout", "b_o"): ("vocab",),
}


def make_mesh(shape: dict[str, int] | None = None, devices=None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh; one size may be -1, meaning "the remaining devices".

    Example:
      >>> mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
      >>> dict(mesh.shape)
      {'data': 1, 'fsdp': 1, 'tensor': 1}
    """
    devices = jax.devices() if devices is None else devices
    sizes = [int((shape or {"data": -1}).get(axis, 1)) for axis in MESH_AXES]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh shape {shape}: sizes must be positive, with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if unknown:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide the {len(devices)} devices")
        sizes[unknown[0]] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
                         f"{len(devices)} are available")  # fmt: skip
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_axes(path, leaf) -> tuple[str | None, ...]:
    """Logical axis names of one parameter, from its dict key; extra leading axes are stacked ``layers``."""
    keys = tuple(str(getattr(p, "key", p)) for p in path)
    recurrent = _RECURRENT_PARAM_AXES.get(keys[-2:]) or _RECURRENT_PARAM_AXES.get(keys[-1:])
    if recurrent is not None and len(recurrent) == leaf.ndim:
        return recurrent
    key = keys[-1] if keys else ""
    names = _PARAM_AXES.get(key)
    if names is None or len(names) > leaf.ndim:
        return (None,) * leaf.ndim
    return ("layers",) * (leaf.ndim - len(names)) + names


def logical_to_spec(names, shape, mesh: Mesh, rules=LOGICAL_RULES) -> PartitionSpec:
    """Maps logical names to mesh axes, replicating where a dimension does not divide or an axis repeats."""
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape, strict=True):
        axes = rules.get(name) if name else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_shardings(abstract_params, mesh: Mesh):
    """``NamedSharding`` for every parameter of a (possibly abstract) parameter tree."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, logical_to_spec(logical_axes(path, leaf), leaf.shape, mesh)),
        abstract_params,
    )


def state_shardings(abstract_state, mesh: Mesh, tx: optax.GradientTransformation):
    """Shardings for ``{"params", "opt_state", ...}``: optimizer moments follow their parameters."""
    params = param_shardings(abstract_state.params, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract_state.opt_state,
        params,
        transform_non_params=lambda _: replicated,
    )
    return abstract_state.replace(step=replicated, params=params, opt_state=opt_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split along their first axis over ``data`` x ``fsdp``."""
    return NamedSharding(mesh, PartitionSpec(LOGICAL_RULES["batch"]))


def batch_divisor(mesh: Mesh) -> int:
    """The batch size must be a multiple of this (the number of batch shards)."""
    return math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])


def put_global_batch(batch, mesh: Mesh):
    """This process's rows of a global batch -> global arrays split over ``data`` x ``fsdp``.

    Each process passes its own contiguous block of rows (the data pipeline's per-host shard); on one process
    that is the whole batch.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda rows: jax.make_array_from_process_local_data(sharding, rows), batch)


def put_replicated_host_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """A batch that every process holds in full (e.g. sentences to decode) -> one global array split over the
    batch axes; each process contributes the rows of its own devices."""
    return jax.make_array_from_callback(batch.shape, batch_sharding(mesh), lambda index: batch[index])


def fetch_global(array: jax.Array) -> np.ndarray:
    """The whole of a global array on every process (an all-gather when it spans several processes)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def initialize_distributed(parallel_config) -> bool:
    """``jax.distributed.initialize`` when the config asks for it or a launcher set ``JAX_COORDINATOR_ADDRESS``.

    Must run before anything touches a device. Fields left at their defaults ("", 0, -1) are detected by JAX
    (TPU pods, SLURM, Open MPI). Returns whether this is a multi-process run.
    """
    explicit = {
        "coordinator_address": parallel_config.get("coordinator_address") or None,
        "num_processes": parallel_config.get("num_processes") or None,
        "process_id": None if parallel_config.get("process_id", -1) < 0 else parallel_config.process_id,
    }
    explicit = {key: value for key, value in explicit.items() if value is not None}
    if not (parallel_config.get("distributed") or explicit or os.environ.get("JAX_COORDINATOR_ADDRESS")):
        return False
    jax.distributed.initialize(**explicit)
    return True


_lockstep_seen: dict[str, set] = {}  # name -> signatures already run


def lockstep(jitted, name: str):
    """``jitted`` (a ``jax.jit`` or ``jax.pmap``) whose first call at each new signature starts on every process
    together: compile ahead of time, ``hosts.barrier``, then run; with one process, ``jitted`` itself.

    Otherwise a process that compiles more than 30 s longer than another fails the run in its first collective.
    Every process must make the same calls in the same order, as SPMD code does. ``name`` identifies ``jitted``
    for the run, so wrapping it again is cheap.
    """
    if jax.process_count() == 1:
        return jitted
    seen = _lockstep_seen.setdefault(name, set())

    def call(*args, **kwargs):
        key = _signature((args, kwargs))
        if key not in seen:
            jitted.lower(*args, **kwargs).compile()  # the call below finds it in the compilation cache
            hosts.barrier(name)
            seen.add(key)
        return jitted(*args, **kwargs)

    return call


def _signature(tree) -> tuple:
    """What a jit cache is keyed on: tree structure, each array's shape/dtype/weak type/sharding, other values."""
    leaves, treedef = jax.tree.flatten(tree)

    def leaf_key(leaf):
        if isinstance(leaf, jax.Array):
            return (jax.typeof(leaf), leaf.sharding)  # the type holds shape, dtype and weak type
        if isinstance(leaf, np.ndarray | np.generic):
            return (leaf.shape, leaf.dtype)
        return (type(leaf), leaf)

    return (treedef, *map(leaf_key, leaves))
