"""Memory-efficient attention (Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory", §2-§3).

Paper equation 1, ``softmax(Q K^T * scale + bias) V``, computed block by block so that no ``T x S`` array is
ever stored: queries are cut into chunks of ``cq`` rows, keys and values into chunks of ``ck`` rows, and for
each query chunk the key chunks are folded in one at a time with a running maximum ``m`` and running sum
``l`` (Rabe & Staats §2 and §3's numerically stable variant; the "online softmax" of Milakov & Gimelshein
2018):

    m' = max(m, rowmax(s))     l' = l e^{m - m'} + rowsum(e^{s - m'})     o' = o e^{m - m'} + e^{s - m'} v

Deviation from the paper: Rabe & Staats get a linear-memory backward pass by wrapping each chunk in
``jax.checkpoint``. Here the backward pass is a ``jax.custom_vjp`` in the style of FlashAttention-2 (Dao 2023,
Algorithm 2): the forward pass saves only the output and the row log-sum-exp ``lse = m + log l``, and the
backward pass recomputes each block's probabilities ``P = exp(s - lse)`` and uses
``D = rowsum(dO * O)``, ``dS = P * (dP - D)``. Peak memory is ``O((T + S) N H)`` plus one ``B N cq ck`` block.

Grouped-query attention reads key/value head ``n // G`` for query head ``n`` by viewing the query as
``[B, T, K, G, H]``; keys and values are never repeated.

Forward mode (``jax.jvp``, ``jacfwd``, ``hessian``, ``jax.linearize``) is not available here, by design: JAX cannot
attach both a ``custom_vjp`` and a forward rule to one function, and the linear-memory backward above needs the
``custom_vjp`` (reverse mode derived by JAX would keep every block's probabilities, O(T S) memory, and a
``custom_jvp`` rule's transpose cannot be the hand-written backward). JAX then raises "can't apply forward-mode
autodiff (jvp) to a custom_vjp function". ``scaled_dot_product_attention`` with ``implementation="xla"`` (what
``None`` picks below 2**27 logits) supports both modes with the same results.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from attn_jax import fused_random
from attn_jax.types import Array, Bool, Float, PRNGKeyArray, upcast_dtype

# One float32 block is B*N*cq*ck*4 bytes: 16 MiB at B=1, N=8, and the backward pass holds about four. At
# T = S = 8192 that keeps the compiled temporary memory at 1/67 of the "xla" path's (the paper's TPU choice,
# 1024 x 4096, gives only 1/11: the chunk sweep in experiments/results/attention.md), while each loop step is still a
# (512 x H) @ (H x 1024) matmul, large enough to amortise the per-iteration overhead on an accelerator.
QUERY_CHUNK_SIZE = 512
KEY_CHUNK_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) description of one call: true lengths and the chunk layout."""

    causal: bool
    scale: float
    dropout_rate: float
    T: int  # true query length (before padding)
    S: int  # true key length
    cq: int  # query chunk size
    ck: int  # key chunk size
    nq: int  # number of query chunks
    nk: int  # number of key chunks
    dtype: str  # compute dtype of logits, softmax and accumulators: promote(float32, input dtype)

    @property
    def compute(self):
        return jnp.dtype(self.dtype)

    @property
    def neg(self):
        """The "xla" path's fill for masked logits."""
        return jnp.finfo(self.compute).min


def chunked_attention(
    query: Float[Array, "B T N H"],
    key: Float[Array, "B S K H"],
    value: Float[Array, "B S K H"],
    *,
    mask: Bool[Array, "#B #N #T #S"] | None,
    bias: Float[Array, "#B #N #T #S"] | None,
    causal: bool,
    scale: float,
    dropout_rate: float,
    dropout_rng: PRNGKeyArray | None,
    query_chunk_size: int = QUERY_CHUNK_SIZE,
    key_chunk_size: int = KEY_CHUNK_SIZE,
) -> Float[Array, "B T N H"]:
    """softmax(Q K^T * scale + bias) V in blocks, with memory linear in ``T`` and ``S``.

    Same semantics as ``scaled_dot_product_attention(..., implementation="xla")``: softmax in
    ``promote(float32, dtype)``, output in
    the query's dtype, zeros (and zero gradients) for a query that may attend to no key. Lengths need not
    divide the chunk sizes: the chunks are balanced and the remainder is padded and masked.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]``, ``N`` a multiple of ``K``.
      value: ``[B, S, K, H]``.
      mask: boolean (True = attend) ``[B|1, N|1, T|1, S|1]``, or None.
      bias: added to the logits, ``[B|1, N|1, T|1, S|1]``, or None; differentiable.
      causal: also mask key ``s > t``; blocks entirely above the diagonal are skipped.
      scale: multiplies ``Q K^T``.
      dropout_rate: attention-weight dropout; 0.0 disables it.
      dropout_rng: key for the dropout (block ``(i, j)`` uses ``fold_in(fold_in(rng, i), j)``).
      query_chunk_size: at most this many queries per block.
      key_chunk_size: at most this many keys per block.

    Returns:
      ``[B, T, N, H]`` in the query's dtype.

    Example:
      >>> q = jnp.ones((1, 5, 2, 4)); k = jnp.ones((1, 7, 1, 4)); v = jnp.arange(28.0).reshape(1, 7, 1, 4)
      >>> out = chunked_attention(q, k, v, mask=None, bias=None, causal=True, scale=0.5, dropout_rate=0.0,
      ...                         dropout_rng=None, query_chunk_size=2, key_chunk_size=3)
      >>> out[0, :, 0, 0].tolist()  # equal logits: query t averages the values of keys 0..t
      [0.0, 2.0, 4.0, 6.0, 8.0]
    """
    if query_chunk_size < 1 or key_chunk_size < 1:
        raise ValueError(f"chunk sizes must be positive, got {query_chunk_size=}, {key_chunk_size=}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rate > 0 needs a dropout_rng")
    B, T, N, H = query.shape
    S, K = key.shape[1], key.shape[2]
    cq, nq = _chunk_layout(T, query_chunk_size)
    ck, nk = _chunk_layout(S, key_chunk_size)
    compute = upcast_dtype(query.dtype).name
    cfg = _Config(bool(causal), float(scale), float(dropout_rate), T, S, cq, ck, nq, nk, compute)
    q = _pad_axis(query, 1, nq * cq, 0).reshape(B, nq * cq, K, N // K, H)  # [B, T, N, H] -> [B, T, K, G, H]
    k = _pad_axis(key, 1, nk * ck, 0)
    v = _pad_axis(value, 1, nk * ck, 0)
    mask = _prepare_blockable(mask, K, cfg, False)
    bias = _prepare_blockable(bias, K, cfg, 0)
    rng = dropout_rng if dropout_rate > 0.0 else None
    out = _attention(cfg, q, k, v, mask, bias, rng)
    return out[:, :T].reshape(B, T, N, H)  # [B, T, K, G, H] -> [B, T, N, H]


def _chunk_layout(length: int, chunk: int) -> tuple[int, int]:
    """(chunk size, number of chunks) covering ``length`` with at most ``chunk`` rows per chunk.

    The chunks are balanced (``ceil(length / count)`` rounded up to a multiple of 8 for the matmul units)
    so a length just above a multiple of ``chunk`` pads a few rows rather than a whole chunk.
    """
    count = _ceil_div(length, chunk)
    size = min(chunk, 8 * _ceil_div(_ceil_div(length, count), 8))
    return size, _ceil_div(length, size)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad_axis(x, axis: int, length: int, value):
    if x.shape[axis] == length:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _prepare_blockable(x, K: int, cfg: _Config, fill):
    """``[B|1, N|1, T|1, S|1] -> [B|1, K|1, G|1, Tp|1, Sp|1]``: heads grouped, full T/S axes padded with ``fill``."""
    if x is None:
        return None
    # [B, N, T, S] -> [B, K, G, T, S];  [B, 1, T, S] -> [B, 1, 1, T, S]
    x = x.reshape(x.shape[0], K, x.shape[1] // K, *x.shape[2:]) if x.shape[1] != 1 else x[:, :, None]
    if x.shape[3] != 1:
        x = _pad_axis(x, 3, cfg.nq * cfg.cq, fill)
    if x.shape[4] != 1:
        x = _pad_axis(x, 4, cfg.nk * cfg.ck, fill)
    return x


def _block_start(x, i, j, cfg: _Config):
    """Start of block (i, j) along the T and S axes of ``x``; a broadcast (size-1) axis stays at 0."""
    return (i * cfg.cq if x.shape[3] != 1 else 0), (j * cfg.ck if x.shape[4] != 1 else 0)


def _block_shape(x, cfg: _Config) -> tuple[int, ...]:
    """Shape of one block of a ``[B|1, K|1, G|1, Tp|1, Sp|1]`` mask or bias: broadcast axes stay size 1."""
    return (*x.shape[:3], min(x.shape[3], cfg.cq), min(x.shape[4], cfg.ck))


def _slice_block(x, i, j, cfg: _Config):
    """Block (i, j) of a ``[B|1, K|1, G|1, Tp|1, Sp|1]`` mask or bias."""
    return lax.dynamic_slice(x, _indices(0, 0, 0, *_block_start(x, i, j, cfg)), _block_shape(x, cfg))


def _indices(*values):
    """Slice starts of one integer type (loop indices are int64 under jax_enable_x64, constants int32)."""
    return tuple(jnp.asarray(v, jnp.int32) for v in values)


def _allowed(cfg: _Config, mask, i, j):
    """Boolean ``[B|1, K|1, G|1, cq, ck]`` "may attend" for block (i, j), or None when nothing is masked."""
    i, j = (jnp.asarray(x, jnp.int32) for x in (i, j))  # loop indices are int64 under jax_enable_x64
    t = i * cfg.cq + lax.broadcasted_iota(jnp.int32, (1, 1, 1, cfg.cq, cfg.ck), 3)
    s = j * cfg.ck + lax.broadcasted_iota(jnp.int32, (1, 1, 1, cfg.cq, cfg.ck), 4)
    allowed = None if mask is None else _slice_block(mask, i, j, cfg)
    if cfg.causal:
        allowed = s <= t if allowed is None else allowed & (s <= t)
    if cfg.nk * cfg.ck != cfg.S:  # padded keys must never be attended
        allowed = s < cfg.S if allowed is None else allowed & (s < cfg.S)
    return allowed


def _block_logits(cfg: _Config, q_i, k_j, mask, bias, i, j):
    """Masked logits (compute dtype) ``[B, K, G, cq, ck]`` of block (i, j) and its "may attend" mask (or None)."""
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q_i, k_j, preferred_element_type=cfg.compute) * cfg.scale
    if bias is not None:
        s = s + _slice_block(bias, i, j, cfg).astype(cfg.compute)
    allowed = _allowed(cfg, mask, i, j)
    if allowed is not None:
        s = jnp.where(allowed, s, cfg.neg)
    return s, allowed


def _dropout_keep(cfg: _Config, rng, i, j, shape):
    """The keep mask of block (i, j): a function of (rng, i, j) only, so the backward pass sees it again."""
    if rng is None:
        return None
    block_rng = fused_random.fold_in(fused_random.fold_in(rng, i), j)
    return fused_random.bernoulli(block_rng, 1.0 - cfg.dropout_rate, shape)


def _key_chunk_end(cfg: _Config, i):
    """One past the last key chunk that query chunk ``i`` can see (causal: the rest lie above the diagonal)."""
    if not cfg.causal:
        return cfg.nk
    return jnp.minimum(cfg.nk, ((i + 1) * cfg.cq - 1) // cfg.ck + 1)


def _query_chunk_start(cfg: _Config, j):
    """The first query chunk that can see key chunk ``j`` (causal: earlier chunks lie above the diagonal)."""
    return (j * cfg.ck) // cfg.cq if cfg.causal else 0


def _forward(cfg: _Config, q, k, v, mask, bias, rng):
    """Online softmax over key chunks, one query chunk at a time. Returns ``O [B, Tp, K, G, H]``, ``lse``."""
    B, _, K, G, H = q.shape

    def query_chunk(i):
        q_i = lax.dynamic_slice_in_dim(q, i * cfg.cq, cfg.cq, axis=1)

        def key_chunk(j, carry):
            acc, m, l = carry  # [B, K, G, cq, H], [B, K, G, cq], [B, K, G, cq]
            k_j = lax.dynamic_slice_in_dim(k, j * cfg.ck, cfg.ck, axis=1)
            v_j = lax.dynamic_slice_in_dim(v, j * cfg.ck, cfg.ck, axis=1)
            s, allowed = _block_logits(cfg, q_i, k_j, mask, bias, i, j)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            if allowed is not None:  # a row masked so far has m_new = neg, so exp(0) = 1 must be zeroed
                p = jnp.where(allowed, p, 0.0)
            alpha = jnp.exp(m - m_new)
            l = l * alpha + jnp.sum(p, axis=-1)
            keep = _dropout_keep(cfg, rng, i, j, p.shape)
            if keep is not None:  # dropout after normalisation: l sums the undropped weights
                p = jnp.where(keep, p / (1.0 - cfg.dropout_rate), 0.0)
            pv = jnp.einsum("BKGTS,BSKH->BKGTH", p.astype(v.dtype), v_j, preferred_element_type=cfg.compute)
            return acc * alpha[..., None] + pv, m_new, l

        init = (
            jnp.zeros((B, K, G, cfg.cq, H), cfg.compute),
            jnp.full((B, K, G, cfg.cq), cfg.neg, cfg.compute),
            jnp.zeros((B, K, G, cfg.cq), cfg.compute),
        )
        acc, m, l = lax.fori_loop(0, _key_chunk_end(cfg, i), key_chunk, init)
        seen = l > 0.0  # False only for a query that may attend to no key: output zeros, not 0/0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out.astype(q.dtype), lse

    out, lse = lax.map(query_chunk, jnp.arange(cfg.nq, dtype=jnp.int32))  # [nq, B, K, G, cq, H], [nq, B, K, G, cq]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(q.shape)  # [nq, B, K, G, cq, H] -> [B, nq*cq, K, G, H]
    lse = jnp.moveaxis(lse, 0, 3).reshape(B, K, G, -1)  # [nq, B, K, G, cq] -> [B, K, G, nq*cq]
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, mask, bias, rng):
    return _forward(cfg, q, k, v, mask, bias, rng)[0]


def _attention_fwd(cfg: _Config, q, k, v, mask, bias, rng):
    out, lse = _forward(cfg, q, k, v, mask, bias, rng)
    return out, (q, k, v, mask, bias, rng, out, lse)


def _reduce_to(x, shape):
    """Sums ``x`` over the axes where ``shape`` is 1 (the broadcast axes of a bias), keeping rank."""
    axes = tuple(a for a, (n, m) in enumerate(zip(x.shape, shape, strict=True)) if m == 1 and n != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _block_grad_logits(cfg: _Config, q_i, k_j, v_j, do_i, lse_i, delta_i, mask, bias, rng, i, j):
    """Recomputes block (i, j): the gradient of the logits ``dS [B, K, G, cq, ck]`` and the dropped weights."""
    s, allowed = _block_logits(cfg, q_i, k_j, mask, bias, i, j)
    p = jnp.exp(s - lse_i[..., None])
    if allowed is not None:  # also zeroes the rows that attend to nothing (their lse is 0, not -inf)
        p = jnp.where(allowed, p, 0.0)
    dp = jnp.einsum("BTKGH,BSKH->BKGTS", do_i, v_j, preferred_element_type=cfg.compute)
    keep = _dropout_keep(cfg, rng, i, j, p.shape)
    if keep is None:
        return p * (dp - delta_i[..., None]), p
    p_dropped = jnp.where(keep, p / (1.0 - cfg.dropout_rate), 0.0)
    dp = jnp.where(keep, dp / (1.0 - cfg.dropout_rate), 0.0)  # d(undropped weights)
    return p * (dp - delta_i[..., None]), p_dropped


def _attention_bwd(cfg: _Config, residuals, d_out):
    """FlashAttention-2 backward: per key chunk, recompute P block by block and accumulate dK, dV, dQ, dBias."""
    q, k, v, mask, bias, rng, out, lse = residuals
    B, _, K, G, H = q.shape
    # D = rowsum(dO * O) = rowsum(P * dP), also with dropout (O is the dropped output).
    delta = jnp.sum(d_out.astype(cfg.compute) * out.astype(cfg.compute), axis=-1)
    delta = jnp.moveaxis(delta, 1, 3)  # [B, Tp, K, G] -> [B, K, G, Tp]

    def key_chunk(carry, j):
        k_j = lax.dynamic_slice_in_dim(k, j * cfg.ck, cfg.ck, axis=1)
        v_j = lax.dynamic_slice_in_dim(v, j * cfg.ck, cfg.ck, axis=1)

        def query_chunk(i, inner):
            dk_j, dv_j, dq, d_bias = inner
            q_i = lax.dynamic_slice_in_dim(q, i * cfg.cq, cfg.cq, axis=1)
            do_i = lax.dynamic_slice_in_dim(d_out, i * cfg.cq, cfg.cq, axis=1)
            lse_i = lax.dynamic_slice_in_dim(lse, i * cfg.cq, cfg.cq, axis=3)
            delta_i = lax.dynamic_slice_in_dim(delta, i * cfg.cq, cfg.cq, axis=3)
            ds, p_dropped = _block_grad_logits(cfg, q_i, k_j, v_j, do_i, lse_i, delta_i, mask, bias, rng, i, j)
            dv_j += jnp.einsum(
                "BKGTS,BTKGH->BSKH", p_dropped.astype(d_out.dtype), do_i, preferred_element_type=cfg.compute
            )
            dk_j += jnp.einsum("BKGTS,BTKGH->BSKH", ds.astype(q.dtype), q_i, preferred_element_type=cfg.compute)
            dq_i = jnp.einsum("BKGTS,BSKH->BTKGH", ds.astype(k.dtype), k_j, preferred_element_type=cfg.compute)
            dq = _add_at(dq, dq_i * cfg.scale, (0, i * cfg.cq, 0, 0, 0))
            if d_bias is not None:
                block = _reduce_to(ds, _block_shape(bias, cfg))
                d_bias = _add_at(d_bias, block, (0, 0, 0, *_block_start(bias, i, j, cfg)))
            return dk_j, dv_j, dq, d_bias

        dq, d_bias = carry
        zeros = jnp.zeros((B, cfg.ck, K, H), cfg.compute)
        init = (zeros, zeros, dq, d_bias)
        dk_j, dv_j, dq, d_bias = lax.fori_loop(_query_chunk_start(cfg, j), cfg.nq, query_chunk, init)
        return (dq, d_bias), (dk_j * cfg.scale, dv_j)

    d_bias = None if bias is None else jnp.zeros(bias.shape, cfg.compute)
    init = (jnp.zeros(q.shape, cfg.compute), d_bias)
    (dq, d_bias), (dk, dv) = lax.scan(key_chunk, init, jnp.arange(cfg.nk, dtype=jnp.int32))
    dk = jnp.moveaxis(dk, 0, 1).reshape(k.shape)  # [nk, B, ck, K, H] -> [B, nk*ck, K, H]
    dv = jnp.moveaxis(dv, 0, 1).reshape(v.shape)
    d_bias = None if bias is None else d_bias.astype(bias.dtype)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, d_bias, None


def _add_at(x, update, start):
    """``x[start : start + update.shape] += update``, in place inside a loop."""
    start = _indices(*start)
    current = lax.dynamic_slice(x, start, update.shape)
    return lax.dynamic_update_slice(x, current + update, start)


_attention.defvjp(_attention_fwd, _attention_bwd)
