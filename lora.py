"""
lora.py: gated LoRA, speed adapters that leave the model exactly as it was (docs/design.md,
"Gated LoRA").

Every target linear layer gets y = W x + g * (B A x) * alpha / rank, where g is 1 at mask positions
and 0 at clean ones (taken from the batch's is_mask for that forward), and the mask token's input
embedding gets a learned offset, also at mask positions only. The base weights are frozen. Clean
tokens never attend to mask tokens, so with the adapters gated off at clean positions the clean
stream is the base model, bit for bit: `ar` decoding gives the base model's greedy output, and
`lossless` gives it too, in fewer forwards.

The adapters hang on the base modules (forward hooks; their weights are submodules named lora_A,
lora_B), so the base weights keep their names: a checkpoint's huggingface/ folder holds the base
model unchanged, which AutoModelForCausalLM loads as the plain base model, plus
next_block_adapter.safetensors and, in config.json, next_block_adapter = {file, rank, alpha,
targets}. On a tensor-parallel layer (attached after model.tensor_parallelize) an adapter is
sharded as its layer is: B by output rows where the layer is column-wise, A by input columns where
it is row-wise.
"""

import math
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                               parallelize_module)

from configurator import UserError
from model import decoder_layers

ADAPTER_FILE = "next_block_adapter.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Gate:
    """Where the adapters are on: is_mask [batch, tokens] of the forward
    being run (None: off everywhere)."""
    mask = None


def _gated(gate, scale):
    def hook(module, args, output):
        if gate.mask is None:
            return output
        x = args[0].to_local() if isinstance(args[0], DTensor) else args[0]  # tensor parallel
        delta = module.lora_B(module.lora_A(x)) * scale
        return torch.where(gate.mask[..., None], output + delta.to(output.dtype), output)

    return hook


def _gated_embedding(gate, model):
    def hook(module, args, output):
        if gate.mask is None:
            return output
        return torch.where(gate.mask[..., None],
                           output + model.next_block_mask_offset.to(output.dtype), output)

    return hook


def add_adapters(model, rank, alpha, targets=DEFAULT_TARGETS):
    """Attach gated adapters to the target linear layers of every decoder layer, and the mask
    embedding offset; freeze everything else. B starts at zero, so the model starts as the base
    model everywhere. Returns the number of adapted layers."""
    gate, scale = Gate(), alpha / rank
    model.next_block_gate = gate
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = 0
    for layer in decoder_layers(model):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
                module.lora_A = nn.Linear(module.in_features, rank, bias=False,
                                          dtype=module.weight.dtype, device=module.weight.device)
                module.lora_B = nn.Linear(rank, module.out_features, bias=False,
                                          dtype=module.weight.dtype, device=module.weight.device)
                nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))
                nn.init.zeros_(module.lora_B.weight)
                if isinstance(module.weight, DTensor):  # a tensor-parallel layer: shard alike
                    column_wise = module.weight.placements[0] == Shard(0)
                    parallelize_module(module.lora_B if column_wise else module.lora_A,
                                       module.weight.device_mesh,
                                       ColwiseParallel() if column_wise else RowwiseParallel())
                module.register_forward_hook(_gated(gate, scale))
                adapted += 1
    if not adapted:
        raise UserError(f"lora_targets={','.join(targets)!r}: no linear layer of the decoder "
                        "layers has one of these names (Llama/Qwen use "
                        f"{','.join(DEFAULT_TARGETS)})")
    embeddings = model.get_input_embeddings()
    model.next_block_mask_offset = nn.Parameter(torch.zeros(embeddings.weight.shape[1],
                                                            dtype=embeddings.weight.dtype,
                                                            device=embeddings.weight.device))
    embeddings.register_forward_hook(_gated_embedding(gate, model))
    model.config.next_block_adapter = {"file": ADAPTER_FILE, "rank": rank, "alpha": alpha,
                                       "targets": list(targets)}
    return adapted


def is_adapter_key(name):
    return ".lora_A." in name or ".lora_B." in name or name.endswith("next_block_mask_offset")


def split_state(state):
    """(base weights, adapter weights) of a full state dict."""
    base = {k: v for k, v in state.items() if not is_adapter_key(k)}
    return base, {k: v for k, v in state.items() if is_adapter_key(k)}


def save_adapter(state, folder):
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, ADAPTER_FILE))


def load_adapter(model, folder):
    """If folder's config names an adapter: attach it to model (loaded as the base model) and load
    its weights. Returns whether there was one."""
    settings = getattr(model.config, "next_block_adapter", None)
    if not settings:
        return False
    path = os.path.join(folder, settings["file"])
    if not os.path.exists(path):
        raise UserError(f"{folder}: config.json names an adapter, but {settings['file']} "
                        "is not there")
    add_adapters(model, settings["rank"], settings["alpha"], settings["targets"])
    weights = load_file(path)
    params = dict(model.named_parameters())
    wanted = {k for k in params if is_adapter_key(k)}
    if set(weights) != wanted:
        raise UserError(f"{path}: does not fit this model (unexpected "
                        f"{sorted(set(weights) - wanted)[:2]}, missing "
                        f"{sorted(wanted - set(weights))[:2]})")
    with torch.no_grad():
        for key, value in weights.items():
            p = params[key]
            if isinstance(p, DTensor):  # tensor parallel: this rank's shard
                value = distribute_tensor(value, p.device_mesh, p.placements).to_local()
                p = p.to_local()
            if p.shape != value.shape:
                raise UserError(f"{path}: {key} has shape {tuple(value.shape)}, the model's "
                                f"{tuple(p.shape)}")
            p.copy_(value)
    model.requires_grad_(False)
    return True
