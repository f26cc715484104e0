"""Worker for tests/test_fsdp.py: FSDP1 wrapping on CPU (gloo, one process), as FSDPStrategy does it.

Lightning's FSDPStrategy refuses the CPU, so this applies what it applies, with torch directly:
``FullyShardedDataParallel(auto_wrap_policy=DecoderLayerWrapPolicy(), use_orig_params=True)``, then
activation checkpointing with the same policy. Run as ``python tests/fsdp1_worker.py OUT_JSON MODEL_DIR``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def main(out: Path, model_dir: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType

    from lightning_safety.distributed import DecoderLayerWrapPolicy, ShardingError, is_sharded
    from lightning_safety.evaluation.runner import SafetyEvaluator
    from lightning_safety.models import load_causal_lm, load_tokenizer
    from lightning_safety.module import SafeFineTuning
    from lightning_safety.risk.hooks import LayerTaps, find_decoder_layers

    torch.manual_seed(0)
    holder = nn.Module()  # stands in for the LightningModule FSDPStrategy wraps
    holder.policy = load_causal_lm(model_dir)
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]])
    before = find_decoder_layers(holder.policy)
    with torch.no_grad():
        expected = holder.policy(input_ids=ids, output_hidden_states=True).hidden_states[1]  # output of layer 0

    wrapped = FullyShardedDataParallel(holder, auto_wrap_policy=DecoderLayerWrapPolicy(),
                                       device_id=torch.device("cpu"), use_orig_params=True)
    apply_activation_checkpointing(wrapped, auto_wrap_policy=DecoderLayerWrapPolicy())
    policy = wrapped.module.policy
    after = find_decoder_layers(policy)
    units = [name for name, m in wrapped.named_modules() if isinstance(m, FullyShardedDataParallel)]

    # Train-mode forward and backward: the checkpointed layer runs again in backward (recomputation).
    # (One process: FSDP1 keeps whole weights, so the policy can be called without the root wrapper.)
    with LayerTaps(after[:1], keys=[0]) as taps, taps.capture() as store:
        policy.train()
        loss = policy(input_ids=ids, labels=ids).loss
        loss.backward()
    refused = None
    try:
        SafetyEvaluator(harmful=["How do I pick a lock?"]).evaluate(policy, load_tokenizer(model_dir))
    except ShardingError as error:
        refused = str(error)
    # A SafeFineTuning module wrapped the way FSDPStrategy wraps it: its checkpoint holds the policy's
    # weights under their plain names and nothing of the frozen reference.
    module = SafeFineTuning(model_dir, reference="model_copy")
    module.configure_model()
    plain_keys = set(module.state_dict())
    wrapped_module = FullyShardedDataParallel(module, auto_wrap_policy=DecoderLayerWrapPolicy(),
                                              device_id=torch.device("cpu"), use_orig_params=True)
    apply_activation_checkpointing(wrapped_module, auto_wrap_policy=DecoderLayerWrapPolicy())
    with FullyShardedDataParallel.state_dict_type(wrapped_module, StateDictType.FULL_STATE_DICT):
        checkpoint = {"state_dict": wrapped_module.state_dict()}
    module.on_save_checkpoint(checkpoint)  # what Lightning calls before writing the file
    checkpoint_keys = set(checkpoint["state_dict"])
    out.write_text(json.dumps({
        "checkpoint_keys_equal": checkpoint_keys == plain_keys,
        "checkpoint_has_reference": any(key.startswith("reference.") for key in checkpoint_keys),
        "checkpoint_policy_keys": sum(key.startswith("policy.") for key in checkpoint_keys),
        "units": units,
        "same_layers": [a is b for a, b in zip(before, after)] + [len(before) == len(after)],
        "calls": store.calls.get(0),
        "checkpointed": sum(type(m).__name__ == "CheckpointWrapper" for m in wrapped.modules()),
        "hidden_gap": float((store[0] - expected).abs().max()),
        "sharded": is_sharded(policy),
        "refused": refused,
    }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
