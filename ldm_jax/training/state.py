"""The train state, created directly in its shardings.

``create_train_state`` never materialises the full parameters on one device: it traces
the initialiser with ``jax.eval_shape``, derives a sharding for every leaf
(``ldm_jax.training.sharding``), and runs the initialiser under
``jax.jit(init, out_shardings=...)`` so each device only computes and stores its shards
(the Flax / big_vision pattern). Random values do not depend on the sharding
(``jax_threefry_partitionable``), so a sharded init equals the single-device one.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ldm_jax.training import sharding as shd


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (all arrays; checkpointed as one tree)."""

    step: jax.Array        # () int32: number of optimizer updates done
    params: Any            # float32 master weights (trained)
    opt_state: Any         # optax state (Adam moments in float32, same shardings as params)
    ema_params: Any        # EMA of params (None when the EMA is off)
    rng: jax.Array         # (2,) uint32 base key; step keys are fold_in(rng, step)


def make_init_fn(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 use_ema: bool = True) -> Callable[[jax.Array], TrainState]:
    """rng -> TrainState: params from ``init_params(params_rng)``, fresh optimizer state."""
    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), init_params(params_rng))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=jax.tree_util.tree_map(jnp.copy, params) if use_ema else None,
            rng=state_rng,
        )

    return init


def state_shardings(abstract_state, mesh: Mesh, min_fsdp_size: int = 2 ** 18,
                    rules: Sequence[shd.Rule] = ()):
    """NamedSharding for every leaf of a (abstract) TrainState."""
    return shd.tree_shardings(abstract_state, mesh, min_fsdp_size, rules)


def abstract_train_state(init_fn: Callable[[jax.Array], TrainState], mesh: Mesh,
                         min_fsdp_size: int = 2 ** 18, rules: Sequence[shd.Rule] = ()):
    """(ShapeDtypeStruct tree carrying shardings, sharding tree) without allocating anything.

    The first is what ``CheckpointManager.restore_latest`` needs to restore into place.
    """
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    shardings = state_shardings(abstract, mesh, min_fsdp_size, rules)
    return shd.with_shardings(abstract, shardings), shardings


def create_train_state(
    init_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rng: jax.Array,
    *,
    use_ema: bool = True,
    min_fsdp_size: int = 2 ** 18,
    rules: Sequence[shd.Rule] = (),
) -> Tuple[TrainState, Any]:
    """A sharded TrainState and its sharding tree.

    ``init_params(rng) -> params`` (e.g. ``lambda k: unet.init(k, *dummy)["params"]``)
    runs inside ``jax.jit(..., out_shardings=...)``.
    """
    init = make_init_fn(init_params, tx, use_ema)
    _, shardings = abstract_train_state(init, mesh, min_fsdp_size, rules)
    state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


def param_count(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def describe_shardings(tree, max_lines: Optional[int] = None) -> str:
    """"path  shape  spec" lines (for logs and debugging the rules)."""
    lines = []

    def add(path, x):
        spec = getattr(getattr(x, "sharding", None), "spec", None)
        lines.append(f"{shd.path_str(path)}  {tuple(x.shape)}  {spec}")

    jax.tree_util.tree_map_with_path(add, tree)
    return "\n".join(lines[:max_lines] if max_lines else lines)
