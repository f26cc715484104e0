"""Sharding helpers that need no process group: layer classes, settings, mesh checks, wrap policy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_safety.distributed import (
    DecoderLayerWrapPolicy,
    ShardingSettings,
    any_rank,
    data_parallel_mesh,
    decoder_layer_classes,
    is_sharded,
    local_parameter_bytes,
)
from lightning_safety.errors import ShardingError
from lightning_safety.models import LoraSettings, apply_lora, load_causal_lm
from lightning_safety.module import SafeFineTuning


class FakeMesh:
    """A 2-D mesh as ModelParallelStrategy names it (only what data_parallel_mesh reads)."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")
    ndim = 2

    def __init__(self, dp: int, tp: int) -> None:
        self.sizes = {"data_parallel": dp, "tensor_parallel": tp}

    def __getitem__(self, name: str):
        mesh = FakeMesh(self.sizes["data_parallel"], 1)
        mesh.mesh_dim_names, mesh.ndim, mesh.dim = (name,), 1, name
        mesh.size = lambda: self.sizes[name]
        return mesh


def test_decoder_layer_classes_from_the_model_also_under_lora(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    classes = decoder_layer_classes(model)
    assert [cls.__name__ for cls in classes] == ["LlamaDecoderLayer"]
    lora = apply_lora(load_causal_lm(str(tiny_model_dir)), LoraSettings(r=2))
    assert decoder_layer_classes(lora) == classes
    holder = nn.Module()
    holder.policy = lora
    assert decoder_layer_classes(holder) == classes
    assert decoder_layer_classes(model, ["LlamaMLP"])[0].__name__ == "LlamaMLP"
    with pytest.raises(ShardingError, match="no decoder-layer class found in Sequential .* set layer_classes"):
        decoder_layer_classes(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ShardingError, match=r"from layer_classes \(\['NoSuchLayer'\]\)"):
        decoder_layer_classes(model, ["NoSuchLayer"])


def test_wrap_policy_wraps_only_the_decoder_layers(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    policy = DecoderLayerWrapPolicy()
    assert policy(model, recurse=True, nonwrapped_numel=0)  # the root is visited first
    wrapped = [name for name, module in model.named_modules() if policy(module, recurse=False, nonwrapped_numel=0)]
    assert wrapped == ["model.layers.0", "model.layers.1"]


def test_sharding_settings_validate_and_map_to_fully_shard():
    settings = ShardingSettings(param_dtype="bfloat16", reduce_dtype="float32", reshard_after_forward=False,
                                layer_classes=["LlamaDecoderLayer"])
    kwargs = settings.fully_shard_kwargs()
    assert kwargs["mp_policy"].param_dtype == torch.bfloat16 and kwargs["mp_policy"].reduce_dtype == torch.float32
    assert kwargs["reshard_after_forward"] is False and settings.layer_classes == ("LlamaDecoderLayer",)
    assert type(ShardingSettings(cpu_offload=True).fully_shard_kwargs()["offload_policy"]).__name__ == "CPUOffloadPolicy"
    with pytest.raises(ShardingError, match="param_dtype='bf16' is invalid: use one of float32, bfloat16, float16"):
        ShardingSettings(param_dtype="bf16")
    with pytest.raises(ShardingError, match="layer_classes is empty"):
        ShardingSettings(layer_classes=[])
    # From a YAML mapping, kept in the hyperparameters as plain values.
    module = SafeFineTuning(sharding={"param_dtype": "bfloat16"})
    assert module.sharding == ShardingSettings(param_dtype="bfloat16")
    assert module.hparams["sharding"]["param_dtype"] == "bfloat16"


def test_data_parallel_mesh_picks_the_dp_dimension_and_refuses_tensor_parallelism():
    assert data_parallel_mesh(FakeMesh(2, 1)).dim == "data_parallel"
    with pytest.raises(ShardingError, match="tensor_parallel_size=4 is not supported: use ModelParallelStrategy"):
        data_parallel_mesh(FakeMesh(1, 4))


def test_unsharded_models_and_no_process_group(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir))
    assert not is_sharded(model)
    assert local_parameter_bytes(model) == sum(p.numel() * 4 for p in model.parameters())
    assert any_rank(True) is True and any_rank(False) is False
