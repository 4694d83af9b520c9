"""Nearest neighbours by L2 distance, exact, on the device: the base set is scanned in chunks
(`lax.scan`), each chunk's distances from one matmul, keeping a running top-k."""

import jax
import jax.numpy as jnp


def nearest(queries: jax.Array, base: jax.Array, k: int,
            chunk: int = 4096) -> tuple[jax.Array, jax.Array]:
    """(squared distances (Q, k), indices (Q, k)) of each query's k nearest rows of `base`,
    nearest first. Rows are flattened vectors; any float or integer dtype."""
    queries = queries.reshape(len(queries), -1).astype(jnp.float32)
    base = base.reshape(len(base), -1)
    n = base.shape[0]
    chunk = min(chunk, n)
    blocks = jnp.pad(base, ((0, -n % chunk), (0, 0))).reshape(-1, chunk, base.shape[1])
    query_norms = jnp.sum(queries**2, axis=1, keepdims=True)

    def scan(best: tuple[jax.Array, jax.Array],
             args: tuple[jax.Array, jax.Array]) -> tuple[tuple[jax.Array, jax.Array], None]:
        number, block = args
        block = block.astype(jnp.float32)
        # |q - b|^2 = |q|^2 - 2 q.b + |b|^2; HIGHEST: no TF32 rounding of the products on GPUs.
        d2 = query_norms - 2 * jnp.dot(queries, block.T, precision=jax.lax.Precision.HIGHEST) \
            + jnp.sum(block**2, axis=1)[None]
        ids = number * chunk + jnp.arange(chunk)
        d2 = jnp.where(ids[None] < n, jnp.maximum(d2, 0.0), jnp.inf)
        all_d = jnp.concatenate([best[0], d2], axis=1)
        all_i = jnp.concatenate([best[1], jnp.broadcast_to(ids, d2.shape)], axis=1)
        neg, pos = jax.lax.top_k(-all_d, k)
        return (-neg, jnp.take_along_axis(all_i, pos, axis=1)), None

    start = (jnp.full((len(queries), k), jnp.inf), jnp.full((len(queries), k), -1, jnp.int32))
    (d2, ids), _ = jax.lax.scan(scan, start, (jnp.arange(len(blocks)), blocks))
    return d2, ids
