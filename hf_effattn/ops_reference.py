"""Pure-PyTorch reference ops for every hf_effattn mixer.

Each op comes in up to three forms with the same semantics:
  * ``chunk_*``      blockwise form for prefill and training (memory linear in T),
  * ``recurrent_*``  token-by-token form for decode,
  * ``naive_*``      the literal definition (materialised matrices), used only by tests.

Layout follows flash-linear-attention: ``[B, T, H, D]``. Linear ops accept more value heads than
query/key heads (GVA, ``HV % H == 0``); the recurrent state is ``[B, HV, K, V]`` and kept in fp32.
This file imports only torch so that it can be copied into a remote-code checkpoint.
"""

import itertools

import torch
import torch.nn.functional as F


def _expand_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    # [B, T, H, D] -> [B, T, num_heads, D], each head repeated num_heads // H times (GQA/GVA groups)
    if x.shape[2] == num_heads:
        return x
    return x.repeat_interleave(num_heads // x.shape[2], dim=2)


def _check_linear_inputs(q, k, v, g, beta):
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:2] != q.shape[:2] or v.shape[2] % q.shape[2] != 0:
        raise ValueError(
            f"v must be [B, T, HV, V] with HV a multiple of the {q.shape[2]} query/key heads, got {tuple(v.shape)}"
        )
    hv = v.shape[2]
    if g is not None and tuple(g.shape[:3]) != (*q.shape[:2], hv):
        raise ValueError(f"g must be [B, T, HV] or [B, T, HV, K] with HV={hv}, got {tuple(g.shape)}")
    if beta is not None and tuple(beta.shape) != (*q.shape[:2], hv):
        raise ValueError(f"beta must be [B, T, HV] with HV={hv}, got {tuple(beta.shape)}")


def _prepare_linear(q, k, v, g, beta, scale, initial_state):
    """Casts to fp32, expands q/k to the value heads and moves heads first: [B, HV, T, D]."""
    _check_linear_inputs(q, k, v, g, beta)
    batch, seq_len, _, key_dim = q.shape
    num_v_heads, value_dim = v.shape[2], v.shape[3]
    scale = key_dim**-0.5 if scale is None else scale
    q = _expand_heads(q.float(), num_v_heads).transpose(1, 2)
    k = _expand_heads(k.float(), num_v_heads).transpose(1, 2)
    v = v.float().transpose(1, 2)
    if g is None:
        g = q.new_zeros(batch, num_v_heads, seq_len, 1)
    else:
        g = g.float().transpose(1, 2)
        # per-head gates become a trailing singleton channel: [B, HV, T, 1]
        g = g.unsqueeze(-1) if g.dim() == 3 else g
    beta = None if beta is None else beta.float().transpose(1, 2)
    if initial_state is None:
        state = q.new_zeros(batch, num_v_heads, key_dim, value_dim)
    else:
        if tuple(initial_state.shape) != (batch, num_v_heads, key_dim, value_dim):
            raise ValueError(
                f"initial_state must be [B, HV, K, V] = {(batch, num_v_heads, key_dim, value_dim)}, "
                f"got {tuple(initial_state.shape)}"
            )
        state = initial_state.float().clone()
    return q, k, v, g, beta, scale, state


def recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
):
    """Token-by-token gated linear attention / (gated) delta rule.

    Args:
        q, k: `[B, T, H, K]`. v: `[B, T, HV, V]`.
        g: log-space decay, `[B, T, HV]` (per head: GDN) or `[B, T, HV, K]` (per channel: GLA, KDA); None = no decay.
        beta: `[B, T, HV]` delta-rule write strength; None = plain (gated) linear attention.
        initial_state: `[B, HV, K, V]`.
    Returns:
        o `[B, T, HV, V]` in q's dtype, and the fp32 final state `[B, HV, K, V]` (or None).

    With S the `[K, V]` state: S_t = exp(g_t) * S_{t-1}; then either S_t += k_t v_t^T (linear attention) or
    S_t += beta_t k_t (v_t - S_t^T k_t)^T (delta rule); o_t = scale * S_t^T q_t.
    """
    dtype = q.dtype
    q, k, v, g, beta, scale, state = _prepare_linear(q, k, v, g, beta, scale, initial_state)
    outputs = []
    for t in range(q.shape[2]):
        # [B, HV, K, 1] decay applied to the rows of the state
        state = state * g[:, :, t].exp().unsqueeze(-1)
        k_t, v_t = k[:, :, t], v[:, :, t]
        if beta is None:
            update = v_t
        else:
            update = (v_t - torch.einsum("bhk,bhkv->bhv", k_t, state)) * beta[:, :, t, None]
        state = state + k_t.unsqueeze(-1) * update.unsqueeze(-2)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, state))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(v.shape[0], 0, v.shape[1], v.shape[3])
    return o.to(dtype), (state if output_final_state else None)


def _decayed_scores(x, y, log_decay):
    """sum_k x[t, k] y[s, k] exp(log_decay[t, s, k]); x, y: [..., C, K], log_decay: [..., C, C, K or 1]."""
    if log_decay.shape[-1] == 1:
        return (x @ y.transpose(-1, -2)) * log_decay.squeeze(-1).exp()
    return torch.einsum("...tk,...sk,...tsk->...ts", x, y, log_decay.exp())


def chunk_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
):
    """Chunked form of `recurrent_linear_attention` (same arguments and results).

    Within a chunk, b_t is the cumulative log decay. The delta rule is solved in WY form: the pseudo-values
    U = (I + A)^-1 beta (V - exp(b) K S_0) with A[s, r] = beta_s sum_k k_s k_r exp(b_s - b_r) for r < s, so that
    S_t = exp(b_t) S_0 + sum_{s<=t} exp(b_t - b_s) k_s u_s^T. Linear attention is the same with U = V.
    """
    dtype = q.dtype
    q, k, v, g, beta, scale, state = _prepare_linear(q, k, v, g, beta, scale, initial_state)
    batch, heads, seq_len, _ = q.shape
    pad = (-seq_len) % chunk_size
    if pad:
        # zero keys/values/gates/betas leave the state untouched, so padding the tail is exact
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
        beta = None if beta is None else F.pad(beta, (0, pad))
    n = q.shape[2] // chunk_size
    # [B, HV, N, C, D]
    q, k, v, g = (x.reshape(batch, heads, n, chunk_size, -1) for x in (q, k, v, g))
    b = g.cumsum(dim=-2)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # [B, HV, N, C, C, K or 1]: b_t - b_s, -inf above the diagonal so that exp() gives exact zeros
    log_decay = (b.unsqueeze(-2) - b.unsqueeze(-3)).masked_fill(~causal[..., None], float("-inf"))
    if beta is not None:
        beta = beta.reshape(batch, heads, n, chunk_size, 1)
        strict = log_decay.masked_fill(causal.diag().diag_embed()[..., None], float("-inf"))
        a = beta * _decayed_scores(k, k, strict)
        eye = torch.eye(chunk_size, dtype=q.dtype, device=q.device)
        u_values = torch.linalg.solve_triangular(a + eye, beta * v, upper=False, unitriangular=True)
        w_keys = torch.linalg.solve_triangular(a + eye, beta * k * b.exp(), upper=False, unitriangular=True)
    scores = _decayed_scores(q, k, log_decay)
    outputs = []
    for i in range(n):
        u = v[:, :, i] if beta is None else u_values[:, :, i] - w_keys[:, :, i] @ state
        o = (q[:, :, i] * b[:, :, i].exp()) @ state + scores[:, :, i] @ u
        outputs.append(o * scale)
        last = b[:, :, i, -1:]
        state = state * last.transpose(-1, -2).exp() + (k[:, :, i] * (last - b[:, :, i]).exp()).transpose(-1, -2) @ u
    o = torch.cat(outputs, dim=2)[:, :, :seq_len]
    return o.transpose(1, 2).to(dtype), (state if output_final_state else None)


def naive_linear_attention(q, k, v, g=None, beta=None, scale=None, initial_state=None, output_final_state=False):
    """Literal fp64 definition of `recurrent_linear_attention`, for tests.

    Linear attention is evaluated in its quadratic (parallel) form; the delta rule as a product of explicit
    `[K, K]` transition matrices S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T.
    """
    dtype = q.dtype
    q, k, v, g, beta, scale, state = _prepare_linear(q, k, v, g, beta, scale, initial_state)
    q, k, v, g, state = (x.double() for x in (q, k, v, g, state))
    seq_len, key_dim = q.shape[2], q.shape[3]
    if beta is None:
        b = g.cumsum(dim=2).expand(*q.shape)
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
        log_decay = (b.unsqueeze(-2) - b.unsqueeze(-3)).masked_fill(~causal[..., None], float("-inf"))
        attn = torch.einsum("bhtk,bhsk,bhtsk->bhts", q, k, log_decay.exp())
        o = (attn @ v + (q * b.exp()) @ state) * scale
        last = b[:, :, -1:] if seq_len else torch.zeros_like(state[:, :, :1, :1]).expand(-1, -1, 1, key_dim)
        final = state * last.transpose(-1, -2).exp() + (k * (last - b).exp()).transpose(-1, -2) @ v
    else:
        beta = beta.double()
        eye = torch.eye(key_dim, dtype=torch.float64, device=q.device)
        outputs = []
        for t in range(seq_len):
            k_t = k[:, :, t]
            decay = torch.diag_embed(g[:, :, t].exp().expand_as(k_t))
            householder = eye - beta[:, :, t, None, None] * k_t.unsqueeze(-1) * k_t.unsqueeze(-2)
            state = householder @ decay @ state + beta[:, :, t, None, None] * k_t.unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
            outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], state) * scale)
        o = torch.stack(outputs, dim=2) if outputs else v.new_zeros(v.shape).double()
        final = state
    return o.transpose(1, 2).to(dtype), (final.float() if output_final_state else None)


def _window_mask(query_index, key_index, key_valid, window):
    """[B, Tq, Tk] boolean: key s is visible to query t when 0 <= t - s < window and the key is not padding."""
    distance = query_index[:, None] - key_index[None, :]
    return ((distance >= 0) & (distance < window))[None] & key_valid[:, None, :]


def _sink_mask(query_index, sink_index, sink_valid, window):
    """[B, Tq, S] boolean: a sink token is attended only once it has left the window (no double counting)."""
    distance = query_index[None, :, None] - sink_index[:, None, :]
    return (distance >= window) & sink_valid[:, None, :]


def _softmax_with_sinks(scores, mask, sink_logits):
    """Masked softmax over the last dim; optional per-head sink logits [H] join the denominator only."""
    scores = scores.masked_fill(~mask, float("-inf"))
    if sink_logits is not None:
        sink = sink_logits.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    peak = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)
    weights = (scores - peak).exp()
    weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    return weights[..., : mask.shape[-1]]


def _prepare_window(q, k, v, key_valid, query_start):
    """fp32, heads first, keys expanded to the query heads; absolute indices of queries and keys."""
    num_heads, seq_len, num_keys = q.shape[2], q.shape[1], k.shape[1]
    if key_valid is None:
        key_valid = torch.ones(k.shape[0], num_keys, dtype=torch.bool, device=k.device)
    # the keys end where the queries end: [past window ; current tokens]
    key_start = query_start + seq_len - num_keys
    query_index = torch.arange(query_start, query_start + seq_len, device=q.device)
    key_index = torch.arange(key_start, key_start + num_keys, device=q.device)
    q = q.float().transpose(1, 2)
    k = _expand_heads(k.float(), num_heads).transpose(1, 2)
    v = _expand_heads(v.float(), num_heads).transpose(1, 2)
    return q, k, v, key_valid.bool(), query_index, key_index


def _visible_keys(start: int, stop: int, offset: int, window: int, naive: bool) -> tuple[int, int]:
    """(lo, hi): the key slice that queries `start ... stop - 1` can see. Query i sits at key position i + offset
    (the keys end where the queries end), so the bounds are plain ints, with no read of a device tensor."""
    return (0 if naive else max(0, start + offset - window + 1)), stop + offset


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    query_start: int = 0,
    sink_k: torch.Tensor | None = None,
    sink_v: torch.Tensor | None = None,
    sink_index: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
    chunk_size: int = 64,
    naive: bool = False,
):
    """Causal sliding-window softmax attention with optional sink tokens and sink logits.

    Args:
        q: `[B, Tq, H, D]` queries at absolute indices `query_start ... query_start + Tq - 1`.
        k, v: `[B, Tk, Hkv, D]` keys ending at the last query (cached window followed by the current tokens).
        window: query t sees keys s with 0 <= t - s < window.
        key_valid: `[B, Tk]` bool, False for padding.
        sink_k, sink_v: `[B, S, Hkv, D]` first tokens kept forever; sink_index `[B, S]` their absolute indices
            (-1 = not seen yet). A sink joins the softmax once it is out of the window.
        sink_logits: `[H]` learned per-head logits added to the softmax denominator (gpt-oss).
        naive: materialise the full `[Tq, Tk]` matrix instead of working block by block.
    Returns:
        `[B, Tq, H, D]` in q's dtype.
    """
    dtype, seq_len = q.dtype, q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, key_valid, query_index, key_index = _prepare_window(q, k, v, key_valid, query_start)
    has_sinks = sink_k is not None and sink_k.shape[1] > 0
    if has_sinks:
        sink_k = _expand_heads(sink_k.float(), q.shape[1]).transpose(1, 2)
        sink_v = _expand_heads(sink_v.float(), q.shape[1]).transpose(1, 2)
        sink_valid = sink_index >= 0
    block = seq_len if naive else chunk_size
    outputs = []
    for start in range(0, seq_len, max(block, 1)):
        stop = min(start + block, seq_len)
        q_idx = query_index[start:stop]
        lo, hi = _visible_keys(start, stop, k.shape[2] - seq_len, window, naive)
        k_blk, v_blk = k[:, :, lo:hi], v[:, :, lo:hi]
        mask = _window_mask(q_idx, key_index[lo:hi], key_valid[:, lo:hi], window)
        scores = q[:, :, start:stop] @ k_blk.transpose(-1, -2) * scale
        if has_sinks:
            k_blk = torch.cat([sink_k, k_blk], dim=2)
            v_blk = torch.cat([sink_v, v_blk], dim=2)
            mask = torch.cat([_sink_mask(q_idx, sink_index, sink_valid, window), mask], dim=-1)
            scores = torch.cat([q[:, :, start:stop] @ sink_k.transpose(-1, -2) * scale, scores], dim=-1)
        weights = _softmax_with_sinks(scores, mask[:, None], sink_logits)
        outputs.append(weights @ v_blk)
    o = torch.cat(outputs, dim=2) if outputs else q.new_zeros(q.shape[0], q.shape[1], 0, v.shape[-1])
    return o.transpose(1, 2).to(dtype)


def hedgehog_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    window: int,
    scale: float | None = None,
    key_valid: torch.Tensor | None = None,
    query_start: int = 0,
    initial_state: torch.Tensor | None = None,
    keep_last: int | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    naive: bool = False,
):
    """LoLCATs attention: exact softmax terms inside a sliding window plus linear-attention terms for every older
    key, sharing one normaliser:

        o_t = (sum_{win} exp(s_ts) v_s + phi(q_t) S) / (sum_{win} exp(s_ts) + phi(q_t) z),

    where S = sum phi(k_s) v_s^T and z = sum phi(k_s) run over keys that left the window.

    Args:
        q: `[B, Tq, H, D]`; k, v: `[B, Tk, Hkv, D]` (cached keys followed by the current ones, as in
            `sliding_window_attention`); phi_q `[B, Tq, H, F]`, phi_k `[B, Tk, Hkv, F]` non-negative features.
        initial_state: `[B, H, F, D + 1]` covering every key older than `k` (last column: the normaliser z).
        keep_last: how many trailing keys the caller keeps as raw keys; the final state absorbs all the others.
    Returns:
        o `[B, Tq, H, D]`, final state `[B, H, F, D + 1]` (fp32) or None.
    """
    dtype, seq_len, num_keys = q.dtype, q.shape[1], k.shape[1]
    num_heads, value_dim, feature_dim = q.shape[2], v.shape[-1], phi_q.shape[-1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, key_valid, query_index, key_index = _prepare_window(q, k, v, key_valid, query_start)
    phi_q = phi_q.float().transpose(1, 2)
    phi_k = _expand_heads(phi_k.float(), num_heads).transpose(1, 2)
    # values augmented with a ones column carry the normaliser through the same products; padding is zeroed
    v_aug = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) * key_valid[:, None, :, None]
    phi_k = phi_k * key_valid[:, None, :, None]
    if initial_state is None:
        state = q.new_zeros(q.shape[0], num_heads, feature_dim, value_dim + 1)
    else:
        state = initial_state.float()
    block = seq_len if naive else chunk_size
    outputs = []
    absorbed = 0
    for start in range(0, seq_len, max(block, 1)):
        stop = min(start + block, seq_len)
        q_idx = query_index[start:stop]
        lo, hi = _visible_keys(start, stop, num_keys - seq_len, window, naive)
        # keys older than every window of this block are folded into the running state
        if lo > absorbed:
            state = state + phi_k[:, :, absorbed:lo].transpose(-1, -2) @ v_aug[:, :, absorbed:lo]
            absorbed = lo
        k_idx = key_index[absorbed:hi]
        in_window = _window_mask(q_idx, k_idx, key_valid[:, absorbed:hi], window)[:, None]
        older = ((q_idx[:, None] - k_idx[None, :]) >= window)[None, None]
        soft = q[:, :, start:stop] @ k[:, :, absorbed:hi].transpose(-1, -2) * scale
        linear = phi_q[:, :, start:stop] @ phi_k[:, :, absorbed:hi].transpose(-1, -2)
        # stable evaluation: numerator and denominator both scaled by exp(-m), m >= 0 the window's peak score
        soft = soft.masked_fill(~in_window, float("-inf"))
        peak = soft.amax(dim=-1, keepdim=True).clamp_min(0.0)
        weights = (soft - peak).exp() + linear * older * (-peak).exp()
        num_den = weights @ v_aug[:, :, absorbed:hi] + (phi_q[:, :, start:stop] @ state) * (-peak).exp()
        outputs.append(num_den[..., :value_dim] / num_den[..., value_dim:].clamp_min(1e-12))
    o = torch.cat(outputs, dim=2) if outputs else q.new_zeros(q.shape[0], num_heads, 0, value_dim)
    final = None
    if output_final_state:
        keep_last = window - 1 if keep_last is None else keep_last
        stop = max(num_keys - keep_last, 0)
        final = q.new_zeros(state.shape) if initial_state is None else initial_state.float()
        final = final + phi_k[:, :, :stop].transpose(-1, -2) @ v_aug[:, :, :stop]
    return o.transpose(1, 2).to(dtype), final


def _sequences(batch: int, seq_len: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """`(row, start, stop)` of every independent sequence: one per batch row, or the packed segments (B = 1)."""
    if cu_seqlens is None:
        return [(row, 0, seq_len) for row in range(batch)]
    if batch != 1:
        raise ValueError(
            f"The batch size is expected to be 1 rather than {batch} when using `cu_seqlens`. "
            "Please flatten variable-length inputs before processing."
        )
    bounds = [int(x) for x in cu_seqlens.tolist()]
    return [(0, lo, hi) for lo, hi in itertools.pairwise(bounds)]


def _topk_lowest_index(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices of the `top_k` largest entries of the last dim (ties: lower index first; -inf entries give -1),
    returned in ascending index order with the -1 entries last."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    taken = order.indices[..., :top_k]
    taken = torch.where(order.values[..., :top_k] > float("-inf"), taken, -1)
    if taken.shape[-1] < top_k:
        taken = F.pad(taken, (0, top_k - taken.shape[-1]), value=-1)
    # ascending, with the empty (-1) slots last
    big = torch.iinfo(taken.dtype).max
    taken = torch.sort(torch.where(taken < 0, big, taken), dim=-1).values
    return torch.where(taken == big, -1, taken)


@torch.no_grad()
def block_topk_select(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int = 64,
    top_k: int = 16,
    keep_first_block: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which key blocks each query block reads (parameter-free, MoBA-style pooled scores shared by each GQA group).

    Blocks are `block_size` consecutive tokens counted from the sequence start. Query block `i` scores every earlier
    key block `j < i` (`j >= 1` with `keep_first_block`, which keeps block 0 anyway) by `qbar_{i-1} . kbar_j`:
    `kbar_j` is the mean of block `j`'s keys and `qbar_{i-1}` the mean of the *previous* query block's queries over
    its tokens and the group's heads. The previous block is complete when block `i` starts, so a decode step makes the
    same choice as the full forward. Query block 0 has no candidates.

    Args:
        q: `[B, T, H, D]`; k: `[B, T, Hkv, D]` (rope applied). cu_seqlens: `[N + 1]` packed sequences (B = 1).
    Returns:
        `[B, NQ, Hkv, top_k]` int32 key-block indices (relative to the sequence start), ascending, -1 for empty slots;
        NQ = ceil(T / block_size), or the total over packed sequences. Ties go to the lower index.
    """
    batch, seq_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    groups = num_heads // num_kv_heads
    first = 1 if keep_first_block else 0
    outputs = []
    for row, start, stop in _sequences(batch, seq_len, cu_seqlens):
        length = stop - start
        num_blocks = -(-length // block_size)
        complete = length // block_size
        taken = torch.full((num_blocks, num_kv_heads, top_k), -1, dtype=torch.int32, device=q.device)
        if num_blocks > 1:
            used = slice(start, start + complete * block_size)
            # [NC, Hkv, D]: block means of the group's queries and of the keys
            q_mean = q[row, used].float().view(complete, block_size, num_kv_heads, groups, head_dim).mean(dim=(1, 3))
            k_mean = k[row, used].float().view(complete, block_size, num_kv_heads, head_dim).mean(dim=1)
            # [Hkv, NQ - 1, NC]: query block i = 1 ... NQ - 1 scored with the means of block i - 1
            scores = torch.einsum("ihd,jhd->hij", q_mean[: num_blocks - 1], k_mean)
            i = torch.arange(1, num_blocks, device=q.device)[:, None]
            j = torch.arange(complete, device=q.device)[None, :]
            scores = scores.masked_fill(~((j < i) & (j >= first)), float("-inf"))
            taken[1:] = _topk_lowest_index(scores, top_k).transpose(0, 1).int()
        outputs.append(taken)
    if cu_seqlens is None:
        return torch.stack(outputs) if outputs else q.new_zeros(0, 0, num_kv_heads, top_k, dtype=torch.int32)
    return torch.cat(outputs)[None]


def _selected_blocks(block_indices: torch.Tensor, keep_first_block: bool) -> torch.Tensor:
    """`[NQ, Hkv, top_k + 2]` every key block query block i reads: the first block (if kept and i > 0), the top-k
    blocks and its own block; -1 marks an empty slot."""
    num_blocks, num_kv_heads = block_indices.shape[:2]
    i = torch.arange(num_blocks, device=block_indices.device)[:, None, None].expand(-1, num_kv_heads, 1)
    first = torch.where((i > 0) & keep_first_block, 0, -1)
    return torch.cat([first, block_indices.long(), i], dim=-1)


def block_topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int = 64,
    top_k: int = 16,
    keep_first_block: bool = True,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    naive: bool = False,
    max_blocks_per_step: int = 16,
) -> torch.Tensor:
    """Block-sparse causal softmax attention over the key blocks `block_topk_select` picks.

    Query `t` of block `i` attends, with exact causal softmax, to the union of its own block (keys `<= t`), block 0
    (with `keep_first_block`) and the `top_k` selected blocks. The selection is not differentiable (as in MoBA/NSA);
    gradients flow to q, k and v through the attention.

    Args:
        q: `[B, T, H, D]`; k, v: `[B, T, Hkv, D]`. cu_seqlens: `[N + 1]` packed sequences (B = 1).
        block_indices: a precomputed selection (`block_topk_select`'s layout); computed when None.
        naive: materialise the `[T, T]` mask (tests only).
        max_blocks_per_step: query blocks gathered at once (bounds the memory of the blockwise form).
    Returns:
        `[B, T, H, D]` in q's dtype.
    """
    batch, seq_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    groups = num_heads // num_kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    if block_indices is None:
        block_indices = block_topk_select(q, k, block_size, top_k, keep_first_block, cu_seqlens)
    first_block, outputs = 0, []
    for row, start, stop in _sequences(batch, seq_len, cu_seqlens):
        num_blocks = -(-(stop - start) // block_size)
        selected = block_indices[0 if cu_seqlens is not None else row]
        if cu_seqlens is not None:
            selected = selected[first_block : first_block + num_blocks]
            first_block += num_blocks
        if stop == start:
            continue
        blocks = _selected_blocks(selected[:num_blocks], keep_first_block)
        args = (q[row, start:stop], k[row, start:stop], v[row, start:stop], blocks, block_size, scale, groups)
        out = _naive_block_topk(*args) if naive else _blockwise_block_topk(*args, max_blocks_per_step)
        outputs.append((start, stop, out))
    if cu_seqlens is None:
        return torch.stack([out for _, _, out in outputs]).to(q.dtype)
    # packed: tokens outside every sequence stay zero
    parts, cursor = [], 0
    for start, stop, out in outputs:
        parts += [q.new_zeros(start - cursor, num_heads, head_dim, dtype=torch.float32), out]
        cursor = stop
    parts.append(q.new_zeros(seq_len - cursor, num_heads, head_dim, dtype=torch.float32))
    return torch.cat(parts)[None].to(q.dtype)


def _naive_block_topk(q, k, v, blocks, block_size, scale, groups):
    """One sequence: `[T, T]` visibility mask per kv head, then masked softmax (fp32)."""
    length = q.shape[0]
    position = torch.arange(length, device=q.device)
    block_of = position // block_size
    # [Hkv, T, NB]: whether query t's block reads key block b
    num_blocks = blocks.shape[0]
    reads = torch.zeros(blocks.shape[1], num_blocks, num_blocks + 1, dtype=torch.bool, device=q.device)
    target = torch.where(blocks >= 0, blocks, num_blocks).permute(1, 0, 2)
    reads.scatter_(2, target, True)
    reads = reads[:, block_of][:, :, block_of]
    mask = reads & (position[None, :, None] >= position[None, None, :])
    mask = mask.repeat_interleave(groups, dim=0)
    k, v = k.float().repeat_interleave(groups, dim=1), v.float().repeat_interleave(groups, dim=1)
    scores = torch.einsum("thd,shd->hts", q.float(), k) * scale
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("hts,shd->thd", weights, v)


def _blockwise_block_topk(q, k, v, blocks, block_size, scale, groups, max_blocks_per_step):
    """One sequence, a few query blocks at a time: gather each query block's key blocks, then masked softmax."""
    length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    num_blocks = blocks.shape[0]
    pad = num_blocks * block_size - length
    # [NB, S, Hkv, D] key/value blocks (the tail zero-padded) and [NB, S, Hkv, G, D] query blocks
    k_blocks = F.pad(k.float(), (0, 0, 0, 0, 0, pad)).view(num_blocks, block_size, num_kv_heads, head_dim)
    v_blocks = F.pad(v.float(), (0, 0, 0, 0, 0, pad)).view(num_blocks, block_size, num_kv_heads, head_dim)
    q_blocks = F.pad(q.float(), (0, 0, 0, 0, 0, pad)).view(num_blocks, block_size, num_kv_heads, groups, head_dim)
    offsets = torch.arange(block_size, device=q.device)
    heads = torch.arange(num_kv_heads, device=q.device)[None, :, None]
    outputs = []
    for lo in range(0, num_blocks, max_blocks_per_step):
        hi = min(lo + max_blocks_per_step, num_blocks)
        chosen = blocks[lo:hi]
        # [n, Hkv, P = (top_k + 2) * S] absolute key positions and their validity for query offset t
        key_pos = (chosen.clamp_min(0)[..., None] * block_size + offsets).flatten(2)
        key_ok = (chosen >= 0)[..., None].expand(-1, -1, -1, block_size).flatten(2) & (key_pos < length)
        query_pos = torch.arange(lo, hi, device=q.device)[:, None] * block_size + offsets
        # [n, Hkv, P, D]
        block_ids = chosen.clamp_min(0)
        k_sel = k_blocks[block_ids, :, heads].flatten(2, 3)
        v_sel = v_blocks[block_ids, :, heads].flatten(2, 3)
        # [n, Hkv, S * G, D] queries of the block, token-major
        q_sel = q_blocks[lo:hi].permute(0, 2, 1, 3, 4).flatten(2, 3)
        scores = q_sel @ k_sel.transpose(-1, -2) * scale
        # [n, Hkv, S * G, P]: causal within the own block, nothing past the sequence end
        visible = key_ok[:, :, None, :] & (key_pos[:, :, None, :] <= query_pos[:, None, :, None])
        visible = visible.repeat_interleave(groups, dim=2)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out = (weights @ v_sel).view(hi - lo, num_kv_heads, block_size, groups, head_dim)
        outputs.append(out.permute(0, 2, 1, 3, 4).reshape((hi - lo) * block_size, num_heads, head_dim))
    return torch.cat(outputs)[:length]


def block_topk_cached_attention(
    q: torch.Tensor,
    k_all: torch.Tensor,
    v_all: torch.Tensor,
    state: dict | None,
    first_real: torch.Tensor,
    block_size: int = 64,
    top_k: int = 16,
    keep_first_block: bool = True,
    scale: float | None = None,
    attend: bool = True,
    max_keys_per_step: int = 2**24,
):
    """`block_topk_attention` for the newest tokens of a cache: decode steps and prefill continuations.

    The block means live in `state` so that a step scores `O(T / block_size)` pooled keys and reads
    `O((top_k + 2) * block_size)` keys. Blocks count from each row's first real token (`first_real`), so left padding
    never shifts them, and padding keys are never read.

    Args:
        q: `[B, Tn, H, D]` the new queries; k_all, v_all: `[B, L, Hkv, D]` the whole cache, new tokens last.
        state: `{"kbar": [B, NB, Hkv, D] key-block means, "qbar": [B, Hkv, D] query mean of the last complete block,
            "qsum": [B, Hkv, D] query sum of the block in progress}` (fp32), or None before the first token.
        first_real: `[B]` cache index of each row's first real token.
        attend: False only updates the state (the prefill output came from `block_topk_attention`).
    Returns:
        (`[B, Tn, H, D]` in q's dtype, or None; the new state). Queries on padding give zeros.
    """
    batch, num_new, num_heads, head_dim = q.shape
    total, num_kv_heads = k_all.shape[1], k_all.shape[2]
    groups, size = num_heads // num_kv_heads, block_size
    scale = head_dim**-0.5 if scale is None else scale
    device = q.device
    past = total - num_new
    # relative positions (tokens since the row's first real token) before and after this step
    rel_old = (past - first_real).clamp_min(0)
    rel_new = (total - first_real).clamp_min(0)
    rel = past + torch.arange(num_new, device=device)[None, :] - first_real[:, None]
    real = rel >= 0

    # key blocks completed by this step: at most ceil(Tn / S) per row
    new_blocks = -(-num_new // size)
    capacity = -(-total // size) + new_blocks
    kbar = q.new_zeros(batch, capacity, num_kv_heads, head_dim, dtype=torch.float32)
    if state is not None:
        kbar[:, : state["kbar"].shape[1]] = state["kbar"][:, :capacity]
    block_ids = (rel_old // size)[:, None] + torch.arange(new_blocks, device=device)
    positions = first_real[:, None, None] + block_ids[..., None] * size + torch.arange(size, device=device)
    gathered = k_all.gather(
        1, positions.flatten(1).clamp(0, total - 1)[..., None, None].expand(-1, -1, *k_all.shape[2:])
    )
    pooled = gathered.float().view(batch, new_blocks, size, num_kv_heads, head_dim).mean(dim=2)
    done = (block_ids < (rel_new // size)[:, None])[..., None, None]
    index = block_ids[..., None, None].expand(-1, -1, num_kv_heads, head_dim)
    kbar = kbar.scatter(1, index, torch.where(done, pooled, kbar.gather(1, index)))

    # query sums per block touched by this step; slot c is block rel_old // S + c
    slots = (size - 1 + num_new) // size + 1
    first_slot_block = rel_old // size
    q_group = q.float().view(batch, num_new, num_kv_heads, groups, head_dim).sum(dim=3)
    q_group = torch.where(real[..., None, None], q_group, 0.0)
    slot = torch.where(real, rel.div(size, rounding_mode="floor") - first_slot_block[:, None], 0)
    q_sums = q.new_zeros(batch, slots, num_kv_heads, head_dim, dtype=torch.float32)
    if state is not None:
        q_sums[:, 0] = state["qsum"]
    q_sums = q_sums.scatter_add(1, slot[..., None, None].expand_as(q_group), q_group)
    q_last = state["qbar"] if state is not None else q.new_zeros(batch, num_kv_heads, head_dim, dtype=torch.float32)
    # [B, C, Hkv, D]: the query mean that selects for each touched block (its predecessor's)
    q_select = torch.cat([q_last[:, None], q_sums[:, :-1] / (size * groups)], dim=1)
    next_slot = (rel_new // size - first_slot_block)[:, None, None, None].expand(-1, 1, num_kv_heads, head_dim)
    new_state = {
        "kbar": kbar,
        "qbar": q_select.gather(1, next_slot)[:, 0],
        "qsum": q_sums.gather(1, next_slot)[:, 0],
    }
    if not attend:
        return None, new_state

    # selection per touched block: earlier complete blocks, the first one kept aside
    block_i = first_slot_block[:, None] + torch.arange(slots, device=device)
    j = torch.arange(capacity, device=device)
    candidates = (j < block_i[..., None]) & (j >= (1 if keep_first_block else 0))
    scores = torch.einsum("bchd,bjhd->bchj", q_select, kbar)
    scores = scores.masked_fill(~candidates[:, :, None, :], float("-inf"))
    taken = _topk_lowest_index(scores, top_k)
    first = torch.where((block_i > 0) & keep_first_block, 0, -1)[:, :, None, None].expand(-1, -1, num_kv_heads, 1)
    own = block_i[:, :, None, None].expand(-1, -1, num_kv_heads, 1)
    # [B, C, Hkv, top_k + 2] every block each touched query block reads
    chosen = torch.cat([first, taken, own], dim=-1)

    offsets = torch.arange(size, device=device)
    k_heads, v_heads = k_all.transpose(1, 2), v_all.transpose(1, 2)
    outputs = []
    step = max(1, max_keys_per_step // max(1, batch * num_kv_heads * chosen.shape[-1] * size * head_dim))
    for lo in range(0, num_new, step):
        hi = min(lo + step, num_new)
        # [B, n, Hkv, P] the blocks (then keys) of each new token's query block
        tok_slot = slot[:, lo:hi, None, None].expand(-1, -1, num_kv_heads, chosen.shape[-1])
        blocks = chosen.gather(1, tok_slot)
        key_rel = (blocks.clamp_min(0)[..., None] * size + offsets).flatten(-2)
        visible = (blocks >= 0)[..., None].expand(*blocks.shape, size).flatten(-2)
        visible = visible & (key_rel <= rel[:, lo:hi, None, None]) & real[:, lo:hi, None, None]
        key_pos = (first_real[:, None, None, None] + key_rel).clamp(0, total - 1)
        # [B, Hkv, n * P, D] gathered keys and values
        flat = key_pos.permute(0, 2, 1, 3).flatten(2)[..., None].expand(-1, -1, -1, head_dim)
        keys = k_heads.gather(2, flat).float().view(batch, num_kv_heads, hi - lo, -1, head_dim)
        values = v_heads.gather(2, flat).float().view(batch, num_kv_heads, hi - lo, -1, head_dim)
        # [B, Hkv, n, G, D] queries
        queries = q[:, lo:hi].float().view(batch, hi - lo, num_kv_heads, groups, head_dim).transpose(1, 2)
        scores = queries @ keys.transpose(-1, -2) * scale
        mask = visible.permute(0, 2, 1, 3)[:, :, :, None, :]
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
        out = (weights @ values).transpose(1, 2).reshape(batch, hi - lo, num_heads, head_dim)
        outputs.append(out)
    return torch.cat(outputs, dim=1).to(q.dtype), new_state
