"""The KDA mixer (Kimi Linear): per-channel decays, a checkpointable gate, cached decode equal to a full forward."""

import pytest
import torch
from transformers import DynamicCache

from hf_effattn import EffAttnForCausalLM
from hf_effattn.mixer_linear import KimiDeltaAttention

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_gates_are_per_channel_decays(tiny_config):
    model = EffAttnForCausalLM(tiny_config(["kda", "full"])).eval()
    mixer = model.model.layers[0].self_attn
    assert isinstance(mixer, KimiDeltaAttention)
    assert mixer.A_log.shape == (mixer.num_heads,)
    assert mixer.dt_bias.shape == (mixer.num_heads * mixer.head_dim,)
    # gate_rank None: a head_dim-rank gate projection
    assert mixer.f_proj[0].out_features == mixer.head_dim
    g, beta = mixer.gates(torch.randn(2, 5, model.config.hidden_size))
    assert g.shape == (2, 5, mixer.num_heads, mixer.head_dim) and beta.shape == (2, 5, mixer.num_heads)
    assert (g <= 0).all() and ((beta > 0) & (beta < 1)).all()


@torch.no_grad()
def test_cached_decode_matches_full_forward(tiny_config):
    torch.manual_seed(0)
    model = EffAttnForCausalLM(tiny_config(["kda", "full", "kda"])).eval()
    ids = torch.randint(1, 97, (2, 40))
    full = model(ids).logits
    cache = DynamicCache(config=model.config)
    pieces = [model(ids[:, :30], past_key_values=cache, use_cache=True).logits]
    pieces += [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(30, 40)]
    cached = torch.cat(pieces, dim=1)
    assert ((cached - full).abs().max() / full.abs().max()).item() < 1e-4
