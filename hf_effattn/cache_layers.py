"""Cache layers that keep a mixer's own per-row state next to transformers' keys/values.

transformers' batch operations on a cache (beam-search reorders, batch selection and repetition) and `reset` only
know the tensors of their layer classes. A mixer that keeps more per row (block_topk's block means, the sliding
window's sink tokens) caches it on a subclass whose `row_state` attributes follow the rows of the keys/values.
"""

import torch
from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin, LinearAttentionLayer


def map_rows(value, fn):
    """`fn` applied to each tensor of `value`: a tensor, or tuples/lists/dicts of them (nested)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {name: map_rows(x, fn) for name, x in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(map_rows(x, fn) for x in value)
    raise TypeError(f"Per-row cache state holds tensors, tuples, lists and dicts, got {type(value).__name__}.")


# transformers 5.17's DynamicLayer zeroes its keys/values on `reset` and keeps reporting their length (5.18 drops them)
RESET_KEEPS_KEYS = "reset" not in vars(DynamicLayer)


def drop_keys(layer) -> None:
    """Empties a reset `DynamicLayer` (or subclass) whatever the transformers version: a reset layer holds no tokens,
    and `update` grows its keys from empty again."""
    if isinstance(layer, DynamicLayer):
        layer.keys = layer.values = None
        layer.is_initialized = False


def take_over(cls, layer):
    """A new `cls` object holding the attributes of `layer`, whose class must be a base class of `cls`."""
    if type(layer) not in cls.__mro__:
        raise TypeError(f"{cls.__name__} cannot take over a {type(layer).__name__}.")
    adopted = cls.__new__(cls)
    adopted.__dict__.update(layer.__dict__)
    return adopted


class RowStateLayerMixin:
    """Mixed in before a transformers cache layer class: each attribute named in `row_state` holds None or
    batch-first tensors `[B, ...]` (possibly in tuples and dicts).

    Batch reorders (beam search), batch selection and repetition move them with the keys/values, `reset` sets them
    to None, and deepcopy copies them as any attribute.
    """

    row_state: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in self.row_state:
            setattr(self, name, None)

    @classmethod
    def adopt(cls, layer):
        """A layer of this class holding what `layer` (of a base class of this one) holds, and no row state yet."""
        adopted = take_over(cls, layer)
        for name in cls.row_state:
            setattr(adopted, name, None)
        return adopted

    def _map_row_state(self, fn) -> None:
        for name in self.row_state:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, map_rows(value, fn))

    def reset(self) -> None:
        super().reset()
        drop_keys(self)
        for name in self.row_state:
            setattr(self, name, None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_row_state(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_row_state(lambda x: x[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_row_state(lambda x: x.repeat_interleave(repeats, dim=0))


class LinearStateRowsMixin:
    """Mixed in before a transformers linear-attention cache layer class (`LinearAttentionLayer` and its subclasses
    with keys/values): batch selection and repetition move the convolution and recurrent states with their rows.

    transformers moves those states on reorders only: its hybrid layers select and repeat their keys/values alone,
    which silently pairs the states of some rows with the keys of others, and `LinearAttentionLayer` has no batch
    selection or repetition at all.
    """

    @classmethod
    def adopt(cls, layer):
        """A layer of this class holding what `layer` (of a base class of this one) holds."""
        return take_over(cls, layer)

    def _map_linear_states(self, fn) -> None:
        for i in range(self.number_of_states):
            if self.is_conv_states_initialized[i]:
                self.conv_states[i] = fn(self.conv_states[i])
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = fn(self.recurrent_states[i])

    def _keys_values_class(self):
        """The attention layer class that holds this layer's keys/values (None without): its batch operations are
        called directly, so that the states move once even if a later transformers moves them in the hybrid class."""
        for cls in type(self).__mro__:
            if issubclass(cls, DynamicLayer) and not issubclass(cls, LinearAttentionCacheLayerMixin):
                return cls
        return None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        keys_values = self._keys_values_class()
        if keys_values is not None:
            keys_values.batch_select_indices(self, indices)
        self._map_linear_states(lambda x: x[indices.to(x.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        keys_values = self._keys_values_class()
        if keys_values is not None:
            keys_values.batch_repeat_interleave(self, repeats)
        self._map_linear_states(lambda x: x.repeat_interleave(repeats, dim=0))


class LinearStateLayer(LinearStateRowsMixin, LinearAttentionLayer):
    """transformers' linear-attention cache layer (recurrent and convolution states) with batch selection and
    repetition."""


def adopt_layers(past_key_values, classes: dict) -> None:
    """Replaces each layer of `past_key_values` whose exact class `classes` maps by a layer of the mapped class holding
    what it holds (`adopt`)."""
    for layer_idx, layer in enumerate(past_key_values.layers):
        row_class = classes.get(type(layer))
        if row_class is not None:
            past_key_values.layers[layer_idx] = row_class.adopt(layer)


def row_state_layer(past_key_values, layer_idx: int, classes: dict, mixer: str, state: str):
    """The cache layer of `layer_idx`, of one of the `RowStateLayerMixin` classes that `classes` maps transformers'
    layer classes to.

    A transformers layer holding no tokens yet (from a `DynamicCache` built by the caller or by `generate`) is
    replaced first. A layer holding tokens without their row state (words for it: `state`) is refused, as is a layer
    of another class; `mixer` names the layer's kind in those errors.
    """
    layer = past_key_values.layers[layer_idx]
    row_class = classes.get(type(layer))
    if row_class is not None and layer.get_seq_length() == 0:
        layer = past_key_values.layers[layer_idx] = row_class.adopt(layer)
    if row_class is None and not isinstance(layer, tuple(classes.values())):
        raise TypeError(
            f"Layer {layer_idx} ({mixer}) needs a cache layer of transformers' DynamicCache "
            f"({' or '.join(base.__name__ for base in classes)}), got {type(layer).__name__}; pass a DynamicCache or "
            "let the model build its cache."
        )
    names = (row_class or type(layer)).row_state
    if layer.get_seq_length() > 0 and all(getattr(layer, name, None) is None for name in names):
        raise ValueError(
            f"Layer {layer_idx} ({mixer}): the cache holds {layer.get_seq_length()} tokens but not their {state}; "
            "fill the cache with this model's forward (a cache from another model cannot be reused)."
        )
    return layer
