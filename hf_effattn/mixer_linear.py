"""Linear-attention mixers with a fixed-size fp32 recurrent state: `gdn`, `deltanet`, `gla`, `kda`.

All of them share q/k/v/o projections named as in the teacher (GQA-aware: keys/values are repeated over each query
group, so every query head owns one `[K, V]` state), an optional short causal convolution, and a gated output norm.
Padding never reaches the state: padded positions get zero keys, values, write strengths and decays.

With `window > 0` a mixer also runs exact softmax attention over its last `window` tokens (plus `sink_tokens` first
tokens) with the same q/k/v, and adds the recurrent branch scaled per head by `recurrent_scale` (zero at
initialisation, so a converted layer starts as its teacher's attention restricted to the window and the sinks).
The cache then holds the window's keys/values next to the recurrent and convolution states (`hybrid_sliding`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .mixer_common import GatedOutput, Padding, RMSNorm, ShortConvolution, TritonOps, apply_rotary, zero_padding
from .mixer_sliding import windowed_attention
from .ops_reference import chunk_linear_attention, recurrent_linear_attention

# prompts up to this length run token by token at inference; longer ones run chunked
RECURRENT_MAX_LEN = 64
# which ops the mixers run: None = the Triton kernels on CUDA tensors when triton imports, else the torch reference;
# tests set "triton" or "reference" to force one
LINEAR_OPS_OVERRIDE = None


def _import_linear_ops():
    from .linear_attn import chunk_linear_attention as chunk_op
    from .linear_attn import fused_recurrent_linear_attention as recurrent_op

    try:
        from .linear_attn_ops import fused_recurrent_linear_attention_op as graph_op
    except ImportError:
        # no registered op (a checkpoint without its file): compiled decode traces the torch reference step
        graph_op = None
    try:
        from .linear_mixer_fusion import gated_rms_norm, short_conv_qkv

        fusion = (short_conv_qkv, gated_rms_norm)
    except ImportError:
        # a checkpoint without the file: the mixers' torch pre- and post-processing
        fusion = None
    return chunk_op, recurrent_op, graph_op, fusion


LINEAR_OPS = TritonOps("linear (gdn, deltanet, gla, kda)", _import_linear_ops)


def triton_linear_ops():
    """(chunked, token-by-token, token-by-token as a registered custom op) Triton ops, or None where triton is
    missing."""
    return LINEAR_OPS.get()


def linear_ops(x: torch.Tensor, recurrent: bool):
    """The Triton op to run (chunked, or token-by-token when `recurrent`), or None for the torch reference."""
    forced = LINEAR_OPS_OVERRIDE == "triton"
    if LINEAR_OPS_OVERRIDE == "reference" or not (x.is_cuda or forced):
        return None
    if torch.compiler.is_compiling():
        # the token-by-token op is a custom op: torch.compile keeps it whole and CUDA graphs capture its kernel. The
        # chunked op would break the graph: its torch reference is traced instead. The ops were imported by the eager
        # forward that ran before (prefill); if none did, the reference is traced
        ops = LINEAR_OPS.ops
        if ops is None or not (recurrent or forced):
            return None
        return ops[2] if recurrent else ops[0]
    ops = triton_linear_ops()
    if ops is None:
        return None
    return ops[1] if recurrent else ops[0]


def fusion_ops(x: torch.Tensor, mask: torch.Tensor | None):
    """(short_conv_qkv, gated_rms_norm), the fused inference kernels around the linear-attention op, when this
    forward can use them: on the Triton ops' terms, with no gradient to compute, no padded current token, and outside
    torch.compile (which fuses the torch code itself). Else None."""
    if mask is not None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if LINEAR_OPS_OVERRIDE == "reference" or not (x.is_cuda or LINEAR_OPS_OVERRIDE == "triton"):
        return None
    ops = triton_linear_ops()
    return None if ops is None else ops[3]


class LinearMixer(nn.Module):
    use_delta_rule = True

    def __init__(self, config, layer_idx: int):
        super().__init__()
        options = config.mixer_config(layer_idx)
        self.layer_idx = layer_idx
        self.num_heads = options["num_heads"]
        self.num_kv_heads = options["num_kv_heads"]
        self.head_dim = options["head_dim"]
        self.chunk_size = options["chunk_size"]
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.attention_out_bias)
        # Qwen3's per-head q/k RMSNorm, kept so converted weights keep their meaning
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        conv_channels = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.conv1d = ShortConvolution(conv_channels, options["conv_size"]) if options["conv_size"] else None
        self.output = GatedOutput(
            hidden, self.num_heads, self.head_dim, options["output_norm"], options["output_gate"], config.rms_norm_eps
        )
        self.window = options["window"]
        self.num_sinks = options["sink_tokens"]
        if self.window:
            # softmax branch scale is 1/sqrt(d) on the teacher's (rope-rotated) q/k
            self.scaling = self.head_dim**-0.5
            self.recurrent_scale = nn.Parameter(torch.zeros(self.num_heads))

    def gates(self, hidden_states: torch.Tensor):
        """(g, beta): log decay `[B, T, H]` or `[B, T, H, K]` (or None) and write strength `[B, T, H]` (or None)."""
        raise NotImplementedError

    def window_attention(self, q, k, v, position_embeddings, attention_mask, past_key_values, query_start, padding):
        """Softmax attention of the current tokens over the window (cached + current keys) and the sink tokens."""
        batch, seq_len = q.shape[:2]
        shape = (batch, seq_len, -1, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        if position_embeddings is None:
            raise ValueError(f"Layer {self.layer_idx}: a windowed linear mixer needs the rotary position embeddings.")
        cos, sin = position_embeddings
        q, k = apply_rotary(q, k, cos, sin)
        return windowed_attention(
            q,
            k,
            v,
            layer_idx=self.layer_idx,
            window=self.window,
            num_sinks=self.num_sinks,
            scale=self.scaling,
            chunk_size=self.chunk_size,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            query_start=query_start,
            padding=padding,
        )

    def prepare_qkv(self, q, k, v, mask, past_key_values):
        """q, k, v `[B, T, H, D]` for the op from the projections: convolution, keys and values repeated over each
        query group, and (delta rule) unit-norm q and k."""
        batch, seq_len = q.shape[:2]
        qkv = zero_padding(torch.cat([q, k, v], dim=-1), mask)
        if self.conv1d is not None:
            qkv = zero_padding(self.conv1d(qkv, past_key_values, self.layer_idx), mask)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        shape = (batch, seq_len, -1, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        if self.use_delta_rule:
            # the delta rule is stable only for unit-norm keys
            q, k = F.normalize(q.float(), dim=-1).to(q.dtype), F.normalize(k.float(), dim=-1).to(k.dtype)
        return q, k, v

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        past_key_values=None,
        position_embeddings=None,
        query_start: int = 0,
        padding: Padding | None = None,
        **kwargs,
    ):
        batch, seq_len, _ = hidden_states.shape
        if padding is None:
            padding = Padding(attention_mask, batch, seq_len, hidden_states.device)
        mask = padding.current
        q, k = self.q_proj(hidden_states), self.k_proj(hidden_states)
        if self.qk_norm:
            q = self.q_norm(q.unflatten(-1, (-1, self.head_dim))).flatten(2)
            k = self.k_norm(k.unflatten(-1, (-1, self.head_dim))).flatten(2)
        v = self.v_proj(hidden_states)
        windowed = None
        if self.window:
            windowed = self.window_attention(
                q, k, v, position_embeddings, attention_mask, past_key_values, query_start, padding
            )
        fused = fusion_ops(hidden_states, mask)
        if fused is not None:
            # the same steps in one kernel per projection
            if self.conv1d is not None:
                q, k, v = self.conv1d.fused(
                    q, k, v, fused[0], self.head_dim, self.use_delta_rule, past_key_values, self.layer_idx
                )
            else:
                q, k, v = fused[0](q, k, v, None, self.head_dim, l2norm=self.use_delta_rule)
        else:
            q, k, v = self.prepare_qkv(q, k, v, mask, past_key_values)
        g, beta = self.gates(hidden_states)
        g, beta = (None if x is None else zero_padding(x, mask) for x in (g, beta))

        initial_state = None
        if past_key_values is not None:
            layer = past_key_values.layers[self.layer_idx]
            if layer.is_recurrent_states_initialized[0]:
                initial_state = layer.recurrent_states[0]
        use_recurrent = seq_len <= RECURRENT_MAX_LEN and not self.training
        op_args = dict(g=g, beta=beta, initial_state=initial_state, output_final_state=past_key_values is not None)
        triton_op = linear_ops(q, use_recurrent)
        if triton_op is not None:
            o, state = triton_op(q, k, v, **op_args)
        elif use_recurrent:
            o, state = recurrent_linear_attention(q, k, v, **op_args)
        else:
            o, state = chunk_linear_attention(q, k, v, chunk_size=self.chunk_size, **op_args)
        if past_key_values is not None:
            past_key_values.update_recurrent_state(state, self.layer_idx)
        o = self.output(o, hidden_states) if fused is None else self.output.fused(o, hidden_states, fused[1])
        if windowed is not None:
            scale = self.recurrent_scale.to(o.dtype).repeat_interleave(self.head_dim)
            o = windowed.flatten(2).to(o.dtype) + o * scale
        return self.o_proj(o)


class GatedDeltaNet(LinearMixer):
    """Gated DeltaNet (Yang et al., 2024): delta rule with a per-head data-dependent decay, Mamba2-style."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.b_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        self.a_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)
        # decay = -exp(A_log) * softplus(a + dt_bias), as in Mamba2 and fla
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))

    def reset_gate_parameters(self, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """fla's initialisation: A ~ U(1, 16), dt ~ logU(1e-3, 1e-1); returns (A_log, dt_bias) values."""
        a = torch.empty(self.num_heads).uniform_(1, 16, generator=generator)
        dt = torch.exp(torch.rand(self.num_heads, generator=generator) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        # inverse softplus
        return a.log(), dt + torch.log(-torch.expm1(-dt))

    def gates(self, hidden_states):
        beta = self.b_proj(hidden_states).float().sigmoid()
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(hidden_states).float() + self.dt_bias.float())
        return g, beta


class DeltaNet(LinearMixer):
    """DeltaNet (Schlag et al., 2021; Yang et al., 2024): the delta rule without decay."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.b_proj = nn.Linear(config.hidden_size, self.num_heads, bias=False)

    def gates(self, hidden_states):
        return None, self.b_proj(hidden_states).float().sigmoid()


class GatedLinearAttention(LinearMixer):
    """GLA (Yang et al., 2023): linear attention with a per-channel data-dependent decay from a low-rank gate."""

    use_delta_rule = False

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        options = config.mixer_config(layer_idx)
        self.gate_normalizer = options["gate_normalizer"]
        self.gk_proj = nn.Sequential(
            nn.Linear(config.hidden_size, options["gate_rank"], bias=False),
            nn.Linear(options["gate_rank"], self.num_heads * self.head_dim, bias=True),
        )

    def gates(self, hidden_states):
        gk = self.gk_proj(hidden_states).float()
        g = F.logsigmoid(gk) / self.gate_normalizer
        return g.view(*gk.shape[:2], self.num_heads, self.head_dim), None


class KimiDeltaAttention(GatedDeltaNet):
    """KDA (Kimi Linear, 2025): Gated DeltaNet with a per-channel decay, -exp(A_log) * softplus(f(x) + dt_bias) for
    each key channel, f a low-rank projection (rank `gate_rank`, default head_dim)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        rank = config.mixer_config(layer_idx)["gate_rank"] or self.head_dim
        del self.a_proj
        self.f_proj = nn.Sequential(
            nn.Linear(config.hidden_size, rank, bias=False),
            nn.Linear(rank, self.num_heads * self.head_dim, bias=False),
        )
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads * self.head_dim))

    def reset_gate_parameters(self, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated DeltaNet's initialisation, dt drawn per key channel; returns (A_log `[H]`, dt_bias `[H * K]`)."""
        a_log, _ = super().reset_gate_parameters(generator)
        dt = torch.exp(
            torch.rand(self.num_heads * self.head_dim, generator=generator) * (math.log(0.1) - math.log(0.001))
            + math.log(0.001)
        )
        return a_log, dt + torch.log(-torch.expm1(-dt))

    def gates(self, hidden_states):
        beta = self.b_proj(hidden_states).float().sigmoid()
        f = self.f_proj(hidden_states).float() + self.dt_bias.float()
        # [B, T, H, K]: one decay rate per head, scaled per channel
        rate = self.A_log.float().exp().repeat_interleave(self.head_dim)
        g = -rate * F.softplus(f)
        return g.unflatten(-1, (self.num_heads, self.head_dim)), beta
