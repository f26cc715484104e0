"""Capture decoder-layer hidden states with forward hooks.

Layers are found and tapped as module *objects*, never by name: module names change when a
model is wrapped by PEFT (``base_model.model.``), FSDP or activation checkpointing, while the
layer objects stay the same.

A tap records only while armed (``with taps.capture() as store:``), and only the first call of
each layer per capture: a gradient-checkpointing recomputation during backward, or any second
forward inside the block, is ignored, so the store always holds the states of the first forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Hashable, Iterator, Sequence

from torch import Tensor, nn

from lightning_safety.errors import ProbeError


def unwrap_layer(module: nn.Module) -> nn.Module:
    """The block inside FSDP1 (``_fsdp_wrapped_module``) and activation-checkpointing
    (``_checkpoint_wrapped_module``) wrappers: the same object before and after wrapping."""
    while True:
        inner = getattr(module, "_fsdp_wrapped_module", None) or getattr(module, "_checkpoint_wrapped_module", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def find_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a causal LM, in order (also under PEFT, FSDP or activation checkpointing).

    The blocks are the ``nn.ModuleList`` whose children all share one class and that holds the
    most parameters (then: the most children). Counting parameters rather than children keeps a
    mixture-of-experts list (many experts inside one block) from winning over the list of blocks,
    which contains it. Wrapped blocks are returned unwrapped (:func:`unwrap_layer`), so the same
    module objects are found before and after FSDP1 or checkpoint wrapping (FSDP2 wraps nothing:
    it changes a block's class in place).

    Raises:
        ProbeError: the model has no homogeneous ``nn.ModuleList``.
    """
    best: tuple[int, int] | None = None
    layers: list[nn.Module] = []
    for _, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        children = list(module)
        if len({type(child) for child in children}) != 1:
            continue
        rank = (sum(p.numel() for p in module.parameters()), len(children))
        if best is None or rank > best:
            best, layers = rank, [unwrap_layer(child) for child in children]
    if not layers:
        raise ProbeError(
            f"no decoder layers found in {type(model).__name__} (no nn.ModuleList of identical blocks): "
            "pass a Hugging Face causal LM (or its PEFT wrapper)"
        )
    return layers


def resolve_layer_indices(layers: Sequence[int], num_layers: int) -> list[int]:
    """Turn layer indices (negative = from the end, -1 = last block) into non-negative ones, in the given order.

    Raises:
        ProbeError: an index is out of range, or none is given.
    """
    if len(layers) == 0:
        raise ProbeError("no probe layers given: pass at least one decoder layer index, e.g. layers=[-1]")
    resolved: list[int] = []
    for index in layers:
        index = int(index)
        if not -num_layers <= index < num_layers:
            raise ProbeError(
                f"layer {index} is out of range for a model with {num_layers} decoder layers: "
                f"use indices in [{-num_layers}, {num_layers - 1}]"
            )
        resolved.append(index % num_layers)
    if len(set(resolved)) != len(resolved):
        raise ProbeError(f"layers {list(layers)} name the same decoder layer twice: list each layer once")
    return resolved


class CaptureComplete(Exception):
    """Raised by a tap to end a forward early once every tapped layer has been recorded."""


class CapturedStates(dict):
    """Hidden states recorded during one capture: ``key -> Tensor [B, T, H]`` (detached).

    ``calls[key]`` counts how often the layer ran while armed (a checkpointing recomputation shows
    up as a second call that was not recorded).
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[Hashable, int] = {}


def _first_tensor(output: object) -> Tensor:
    """The hidden state in a layer's output: the tensor itself, or the first element of a tuple/ModelOutput."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    to_tuple = getattr(output, "to_tuple", None)  # transformers ModelOutput
    if callable(to_tuple):
        first = to_tuple()[0]
        if isinstance(first, Tensor):
            return first
    raise ProbeError(
        f"a tapped layer returned {type(output).__name__}, not a hidden-state tensor: "
        "tap the model's decoder blocks (see find_decoder_layers)"
    )


class LayerTaps:
    """Forward hooks on given layer modules that record their output hidden states while armed.

    Args:
        layers: the modules to tap (e.g. items of :func:`find_decoder_layers`).
        keys: how each layer is named in the capture store (default: 0, 1, ...).

    Example::

        with LayerTaps.for_model(model, [-1]) as taps, taps.capture() as store:
            model(input_ids)
        last = store[num_layers - 1]  # [B, T, H]
    """

    def __init__(self, layers: Sequence[nn.Module], keys: Sequence[Hashable] | None = None) -> None:
        keys = list(range(len(layers))) if keys is None else list(keys)
        if len(keys) != len(layers) or len(set(keys)) != len(keys):
            raise ProbeError("LayerTaps needs one distinct key per layer: pass as many unique keys as layers")
        self.keys: list[Hashable] = keys
        self.layers: list[nn.Module] = list(layers)
        self._store: CapturedStates | None = None
        self._stop_after: frozenset[Hashable] = frozenset()
        self._handles = [layer.register_forward_hook(self._hook(key)) for key, layer in zip(keys, self.layers)]

    @classmethod
    def for_model(cls, model: nn.Module, layers: Sequence[int]) -> LayerTaps:
        """Tap decoder layers of ``model`` by index (negative allowed); keys are the non-negative indices."""
        blocks = find_decoder_layers(model)
        indices = resolve_layer_indices(layers, len(blocks))
        return cls([blocks[i] for i in indices], keys=indices)

    def _hook(self, key: Hashable):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            store = self._store
            if store is None:
                return
            store.calls[key] = store.calls.get(key, 0) + 1
            if key in store:  # recomputation or a second forward: keep the first
                return
            store[key] = _first_tensor(output).detach()
            if self._stop_after and self._stop_after.issubset(store):
                raise CaptureComplete

        return hook

    @property
    def active(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._handles)

    @contextlib.contextmanager
    def capture(self, stop_after: Collection[Hashable] | None = None) -> Iterator[CapturedStates]:
        """Arm the taps for the block; yields the store that fills during the first forward.

        With ``stop_after`` (keys), the tap that completes those keys raises
        :class:`CaptureComplete` to skip the rest of the network (inference only); the caller
        catches it around the forward.
        """
        if not self._handles:
            raise ProbeError("these LayerTaps were removed: create new taps before capturing")
        if self._store is not None:
            raise ProbeError("LayerTaps.capture() is already armed: do not nest captures on the same taps")
        store = CapturedStates()
        self._store, self._stop_after = store, frozenset(stop_after or ())
        try:
            yield store
        finally:
            self._store, self._stop_after = None, frozenset()

    def remove(self) -> None:
        """Remove every hook (safe to call more than once)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._store = None

    def __enter__(self) -> LayerTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
