"""Sharded training: FSDP2 for the policy *and* the frozen reference, and the rules sharding imposes.

Two ways to shard through Lightning's own strategies:

* **FSDP2** (``ModelParallelStrategy``): :class:`~lightning_safety.module.SafeFineTuning` calls
  :func:`shard_model` from ``configure_model`` on every model it holds, decoder layer by decoder
  layer and then the root, over the strategy's data-parallel mesh. Parameters become DTensors
  sharded along dim 0; frozen and trainable parameters are sharded separately (FSDP2 shards per
  parameter), so LoRA never makes the frozen base keep gradients.
* **FSDP1** (``FSDPStrategy``): Lightning wraps the module after ``configure_model``; give it
  :class:`DecoderLayerWrapPolicy` as ``auto_wrap_policy`` (and ``activation_checkpointing_policy``)
  so the wrap units are the model's decoder layers, read from the model itself.

A sharded model all-gathers its weights inside every forward: **every rank must run the same
forwards in the same order**. Code that may skip a forward on one rank (a risk cache hit, no row
needing the reference, a shorter share of evaluation prompts, generation that stops early) must
first agree with the other ranks (:func:`any_rank`) or pad its work to the same length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from lightning_safety.errors import ShardingError

__all__ = [
    "ShardingSettings",
    "ShardingError",
    "DecoderLayerWrapPolicy",
    "any_rank",
    "check_can_generate",
    "data_parallel_mesh",
    "decoder_layer_classes",
    "is_fsdp1",
    "is_sharded",
    "local_parameter_bytes",
    "shard_model",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ShardingSettings:
    """How :func:`shard_model` applies FSDP2 (``fully_shard``).

    Args:
        param_dtype: dtype the gathered weights are cast to for compute (e.g. ``bfloat16``; None:
            keep the stored dtype). Sharded weights, gradients and optimizer state stay in the
            stored dtype (float32 master weights with ``param_dtype: bfloat16``).
        reduce_dtype: dtype of the gradient reduce-scatter (None: ``param_dtype``). ``float32``
            with ``param_dtype: bfloat16`` avoids summing gradients in bf16.
        reshard_after_forward: free each layer's gathered weights after its forward (saves memory,
            all-gathers again in backward). False keeps them until backward (faster, more memory).
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory.
        layer_classes: class names of the blocks to shard as units; None reads them from the
            Hugging Face model's ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``).
    """

    param_dtype: str | None = None
    reduce_dtype: str | None = None
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    layer_classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in _DTYPES:
                raise ShardingError(f"{name}={value!r} is invalid: use one of {', '.join(_DTYPES)} or None")
        if self.layer_classes is not None:
            object.__setattr__(self, "layer_classes", tuple(self.layer_classes))
            if not self.layer_classes:
                raise ShardingError("layer_classes is empty: give class names (e.g. ['LlamaDecoderLayer']) or None")

    def fully_shard_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``torch.distributed.fsdp.fully_shard`` (without the mesh)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        mp = MixedPrecisionPolicy(
            param_dtype=_DTYPES[self.param_dtype] if self.param_dtype else None,
            reduce_dtype=_DTYPES[self.reduce_dtype] if self.reduce_dtype else None,
        )
        offload = CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy()
        return {"mp_policy": mp, "offload_policy": offload, "reshard_after_forward": self.reshard_after_forward}


def decoder_layer_classes(model: nn.Module, names: Iterable[str] | None = None) -> tuple[type[nn.Module], ...]:
    """The classes of ``model``'s transformer blocks (the units to shard and checkpoint).

    Read from the ``_no_split_modules`` of every Hugging Face ``PreTrainedModel`` inside ``model``
    (the blocks that must not be split across devices are exactly the blocks to wrap), or from
    ``names`` when given. Works through PEFT and Lightning wrappers (it walks the submodules).

    Raises:
        ShardingError: no module of ``model`` has one of those class names.
    """
    if names is None:
        wanted: set[str] = set()
        for module in model.modules():
            wanted.update(getattr(module, "_no_split_modules", None) or ())
        source = "the model's _no_split_modules"
    else:
        wanted, source = set(names), "layer_classes"
    # Walk each class's MRO: fully_shard turns a block's class into a subclass "FSDP<name>".
    found = {cls for module in model.modules() for cls in type(module).__mro__ if cls.__name__ in wanted}
    if not found:
        raise ShardingError(
            f"no decoder-layer class found in {type(model).__name__} from {source} ({sorted(wanted) or 'none'}): "
            "set layer_classes to the class names of its transformer blocks"
        )
    return tuple(sorted(found, key=lambda cls: cls.__name__))


def data_parallel_mesh(mesh: Any) -> Any:
    """The 1-D data-parallel mesh to shard over, from Lightning's ``ModelParallelStrategy`` mesh.

    The strategy's mesh is 2-D (``data_parallel`` x ``tensor_parallel``); passing it whole to
    ``fully_shard`` would mean HSDP (replicate over dim 0, shard over dim 1), i.e. no sharding
    at all with ``tensor_parallel_size=1``.

    Raises:
        ShardingError: tensor parallelism is asked for (not supported by these models' wrapping).
    """
    names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
    if not names:
        if mesh.ndim != 1:
            raise ShardingError(f"a {mesh.ndim}-D device mesh without dimension names: pass a 1-D data-parallel mesh")
        return mesh
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ShardingError(
            f"tensor_parallel_size={mesh['tensor_parallel'].size()} is not supported: use "
            "ModelParallelStrategy(data_parallel_size=<GPUs>, tensor_parallel_size=1)"
        )
    if "data_parallel" in names:
        return mesh["data_parallel"]
    if len(names) == 1:
        return mesh
    raise ShardingError(f"device mesh dimensions {names} have no 'data_parallel': name the sharding dimension so")


def shard_model(model: nn.Module, mesh: Any, settings: ShardingSettings | None = None) -> int:
    """Apply FSDP2 to ``model``: each decoder layer, then the root (embeddings, final norm, head).

    Call it before the optimizer is built (Lightning: in ``configure_model``). A frozen model
    (the reference) is sharded the same way: it then costs ``1 / world_size`` of its bytes per
    rank, and is gathered one layer at a time during its forward.

    Args:
        model: a Hugging Face causal LM, PEFT-wrapped or not.
        mesh: a 1-D device mesh (see :func:`data_parallel_mesh`).
        settings: :class:`ShardingSettings`.

    Returns:
        The number of decoder layers sharded as their own units.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    settings = settings or ShardingSettings()
    classes = decoder_layer_classes(model, settings.layer_classes)
    kwargs = settings.fully_shard_kwargs()
    layers = [module for module in model.modules() if isinstance(module, classes)]
    for layer in layers:
        fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    if callable(getattr(model, "generate", None)):
        # A PEFT wrapper's generate() runs the inner model's forward, not its own: without this
        # the root's weights (embeddings, output layer) would stay sharded during generation.
        register_fsdp_forward_method(model, "generate")
    return len(layers)


def is_sharded(model: nn.Module) -> bool:
    """Whether any part of ``model`` is sharded by FSDP2 (``fully_shard``) or wrapped by FSDP1."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(module, (FSDPModule, FullyShardedDataParallel)) for module in model.modules())


def is_fsdp1(model: nn.Module) -> bool:
    """Whether any part of ``model`` is wrapped by FSDP1 (``FullyShardedDataParallel``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(module, FullyShardedDataParallel) for module in model.modules())


def check_can_generate(model: nn.Module) -> None:
    """Refuse generation from a model wrapped by FSDP1, which cannot run it (FSDP2 can).

    FSDP1 keeps the root's weights (embeddings, output layer) in a flat sharded parameter that
    only the wrapped root's forward gathers, and forbids forwards inside ``summon_full_params``.

    Raises:
        ShardingError: ``model`` is (inside) an FSDP1 wrapper.
    """
    if is_fsdp1(model):
        raise ShardingError(
            "generation from FSDP1-wrapped weights (FSDPStrategy) is not supported: train with FSDP2 "
            "(ModelParallelStrategy(data_parallel_size=<GPUs>, tensor_parallel_size=1)) or evaluate a saved "
            "checkpoint with `lightning-safety evaluate`"
        )


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (a DTensor counts its local shard only)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank if ``flag`` is True on any rank (one all-reduce; ``flag`` itself when not distributed).

    Every rank must call it, at the same point: sharded models use it to agree on whether a
    forward runs at all.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=device or _collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _collective_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class DecoderLayerWrapPolicy:
    """FSDP1 ``auto_wrap_policy`` (and ``activation_checkpointing_policy``) by decoder-layer class.

    The classes are read from the model being wrapped (see :func:`decoder_layer_classes`), so a
    YAML recipe needs no import path of a model class::

        strategy:
          class_path: lightning.pytorch.strategies.FSDPStrategy
          init_args:
            auto_wrap_policy: {class_path: lightning_safety.distributed.DecoderLayerWrapPolicy}

    Args:
        layer_classes: class names to wrap instead of the model's ``_no_split_modules``.
    """

    def __init__(self, layer_classes: list[str] | None = None) -> None:
        self.layer_classes = None if layer_classes is None else tuple(layer_classes)
        self._classes: tuple[type[nn.Module], ...] | None = None

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        """The callable-policy protocol of ``torch.distributed.fsdp.wrap``: visited root first."""
        if self._classes is None:
            # The first call is on the root of the wrap: the whole model is visible from it.
            self._classes = decoder_layer_classes(module, self.layer_classes)
        if recurse:
            return True
        return isinstance(module, self._classes)
