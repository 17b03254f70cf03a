"""
model.py: the model side of next-block training, for any Hugging Face causal LM.

  load_model       a local Hugging Face folder's model (or the tiny demo model), the mask token's
                   embedding row ready, the attention backend chosen
  forward_losses   per-token cross-entropy and argmax at supervised positions, logits in chunks;
                   block_metrics scores the argmax per block offset (acc@k, tpf_tf)
  parallelize      DDP, or FSDP2 (fully_shard per decoder layer, then the root with the tied
                   embeddings); tensor_parallelize shards each decoder layer first (TP, the
                   model's own plan), for a 2-D mesh of FSDP x TP
  peak_flops       what MFU is measured against
(The tokenizer and the mask token are chat.py's; the checkpoint format is checkpoint.py's.)
"""

import inspect

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                               parallelize_module)
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_MASKED_LM_MAPPING_NAMES)
from transformers.utils import logging as hf_logging

from common import all_sum, all_true, to_device
from configurator import UserError, first_line, one_of
from demo import demo_config
from mask import block_mask, dense_mask

hf_logging.disable_progress_bar()  # loading and saving tiny models should not draw progress bars


# -------------------------------------------------------------------------------------------------
# loading

def attention_backend(attention, device, training=False):
    """'flex_attention' (BlockMask) on CUDA, 'sdpa' (dense bool mask) elsewhere;
    attention='flex'|'sdpa' forces one. FlexAttention has no backward on CPU: training refuses it
    there."""
    one_of("attention", attention, ("auto", "flex", "sdpa"))
    cuda = torch.device(device).type == "cuda"
    if attention == "flex" and training and not cuda:
        raise UserError("attention='flex' needs CUDA: FlexAttention has no backward on CPU (use "
                        "attention='sdpa')")
    return "flex_attention" if attention == "flex" or attention == "auto" and cuda else "sdpa"


def init_mask_row(model, mask_id):
    """Give a new mask token its embedding row: a spare row when the matrix is larger than the
    tokenizer (Qwen pads its vocab), else the matrix grows; it never shrinks. The input (and untied
    output) row starts at the mean of the rows before it, the same on every rank."""
    if mask_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(mask_id + 1, pad_to_multiple_of=64, mean_resizing=False)
    with torch.no_grad():
        for weight in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            weight[mask_id] = weight[:mask_id].float().mean(0).to(weight.dtype)


def from_pretrained(folder, attention="sdpa"):
    """AutoModelForCausalLM.from_pretrained in fp32, or one line saying why it cannot load (no
    weights, damaged weights, an unknown model type, an encoder, output weights missing: a head
    transformers would initialise at random, with a warning only)."""
    load_config(folder)  # an encoder: its line before the weights load
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its table of missing weights: said below in one line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation=attention, dtype=torch.float32, output_loading_info=True)
    except Exception as e:  # safetensors' own error class included: the reason, in one line
        raise UserError(f"{folder}: cannot load the model ({first_line(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:  # a tied head is no missing key: it is the embedding
        missing = sorted(info["missing_keys"])
        raise UserError(f"{folder}: {len(missing)} weights of a {type(model).__name__} are not in "
                        f"its files ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
                        "): not a causal LM's checkpoint, or an incomplete one")
    return model


def check_causal(config, folder):
    """One line for a model AutoModelForCausalLM would load with attention that sees the future:
    an encoder (BERT, RoBERTa, ...) with a language-model head, not configured as a decoder."""
    encoders = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) & set(MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    if config.model_type in encoders and not getattr(config, "is_decoder", False):
        raise UserError(f"{folder} is a {config.model_type!r} model, an encoder: its attention is "
                        "not causal (is_decoder is false); next-block SFT needs a causal LM such as "
                        "Qwen, Llama or GPT-2")


def load_config(init_from, demo_overrides=None):
    """The model's config, without its weights (cheap: for the checks before anything slow)."""
    if init_from == "demo":
        return demo_config(**(demo_overrides or {}))
    try:
        config = AutoConfig.from_pretrained(init_from)
    except Exception as e:  # an unknown model type, a damaged config.json: the reason, in one line
        raise UserError(f"{init_from}: cannot read its config.json ({first_line(e)})") from None
    check_causal(config, init_from)
    return config


def load_model(init_from, mask_id, new_mask, device="cpu", attention="auto", demo_overrides=None):
    """The model in fp32 on device (init_from: a local HF folder, or 'demo'), its mask token's row
    ready."""
    backend = attention_backend(attention, device)
    if init_from == "demo":
        model = AutoModelForCausalLM.from_config(load_config(init_from, demo_overrides),
                                                 attn_implementation=backend, dtype=torch.float32)
    else:
        model = from_pretrained(init_from, backend)
    if new_mask:
        init_mask_row(model, mask_id)
    model.config.mask_token_id = mask_id
    return model.to(device)


def cache_kwarg(model):
    """The forward argument that takes the KV cache: 'cache' in transformers >= 5.24,
    'past_key_values' before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# -------------------------------------------------------------------------------------------------
# forward and loss

def attention_mask(batch, model):
    """The batch's attention rule in the form the model's attention backend takes."""
    impl = unwrap(model).config._attn_implementation
    return block_mask(batch) if impl == "flex_attention" else dense_mask(batch)


def _ce_chunk(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, labels, reduction="none"), logits.argmax(-1)


def forward_losses(model, batch):
    """Run the model on a collated batch; return (per-token loss, argmax, is_mask) at the supervised
    positions.

    The [tokens, vocab] logits never exist at once: the lm_head input is captured by a hook (lm_head
    itself sees zero tokens), then logits and loss are computed chunk by chunk, each chunk's logits
    recomputed in backward. Memory stays one chunk of logits whatever the vocabulary (about 2^27
    logits on a GPU, 2^24 on CPU).
    """
    lm_head = unwrap(model).get_output_embeddings()
    captured = {}

    def take_hidden(module, args):
        captured["hidden"] = args[0]
        return (args[0][..., :0, :],)

    handle = lm_head.register_forward_pre_hook(take_hidden)
    set_gate(model, batch["is_mask"])  # gated adapters, if any, act on the mask positions only
    try:
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
              attention_mask=attention_mask(batch, model), use_cache=False)
    finally:
        handle.remove()
    supervised = batch["labels"] != -100
    hidden, labels = captured["hidden"][supervised], batch["labels"][supervised]
    weight = lm_head.weight
    chunk = max(256, (2**27 if weight.is_cuda else 2**24) // weight.shape[0])
    losses, preds = [], []
    for i in range(0, len(labels), chunk):
        args = (hidden[i:i + chunk], weight, labels[i:i + chunk])
        grad = torch.is_grad_enabled()
        loss, pred = checkpoint(_ce_chunk, *args, use_reentrant=False) if grad else _ce_chunk(*args)
        losses.append(loss)
        preds.append(pred)
    is_mask = batch["is_mask"][supervised]
    if not losses:  # nothing supervised: a loss that keeps the graph (every rank runs backward)
        return hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0, labels, is_mask
    return torch.cat(losses), torch.cat(preds), is_mask


def block_metrics(pred, batch, block_size):
    """Counts for per-offset accuracy and tpf_tf, as one float tensor to all-reduce:
    [correct@0..B-1, total@0..B-1, accepted, blocks]. acc@k = correct/total; tpf_tf =
    accepted/blocks, where a block accepts 1 + the length of the correct prefix of its mask
    predictions (what lossless decoding would reach under teacher forcing). pred: argmax ids shaped
    like batch['labels']."""
    B = block_size
    offset, labels = batch["offset"].flatten(), batch["labels"].flatten()
    ok = (pred.flatten() == labels) & (offset >= 0)
    counts = torch.zeros(2 * B + 2, dtype=torch.float64)
    counts[:B] = torch.bincount(offset[ok], minlength=B)[:B].double()
    counts[B:2 * B] = torch.bincount(offset[offset >= 0], minlength=B)[:B].double()
    # masks of one group sit together, in offset order 1, 2, ...: a mask counts when no mask before
    # it in its group (itself included) is wrong
    mask_ok = ok[offset >= 1]
    group = torch.cumsum((offset[offset >= 1] == 1).long(), 0)
    wrong = torch.cumsum((~mask_ok).long(), 0)
    wrong_before_group = torch.zeros(int(group.max()) + 1 if len(group) else 1, dtype=torch.long)
    starts = offset[offset >= 1] == 1
    wrong_before_group[group[starts]] = (wrong - (~mask_ok).long())[starts]
    prefix_ok = (wrong - wrong_before_group[group]) == 0
    counts[2 * B] = float(batch["block_start"].sum() + prefix_ok.sum())
    counts[2 * B + 1] = float(batch["block_start"].sum())
    return counts


def summarize_metrics(counts, block_size):
    """{acc@k, tpf_tf} from block_metrics' counts (summed over batches and ranks)."""
    B = block_size
    out = {f"acc@{k}": (counts[k] / counts[B + k]).item() if counts[B + k] else float("nan")
           for k in range(B)}
    blocks = counts[2 * B + 1]
    out["tpf_tf"] = (counts[2 * B] / blocks).item() if blocks else float("nan")
    return out


@torch.no_grad()
def evaluate(model, batches, block_size, device, autocast, tp=1):
    """val_loss_ar, val_loss_mask, acc@0..B-1 and tpf_tf over every rank's eval batches (the ranks
    of a tensor-parallel group see the same batches: counted once)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    counts = torch.zeros(2 * block_size + 2, dtype=torch.float64)
    for batch in batches:
        batch = to_device(batch, device)
        with autocast:
            losses, preds, is_mask = forward_losses(model, batch)
        sums += torch.tensor([losses[~is_mask].sum().item(), (~is_mask).sum().item(),
                              losses[is_mask].sum().item(), is_mask.sum().item()],
                             dtype=torch.float64)
        full_pred = batch["labels"].clone()
        full_pred[batch["labels"] != -100] = preds
        counts += block_metrics(full_pred.cpu(), {k: v.cpu() for k, v in batch.items()}, block_size)
    sums, counts = all_sum(sums.to(device)).cpu() / tp, all_sum(counts.to(device)).cpu() / tp
    model.train()
    return {"val_loss_ar": (sums[0] / sums[1].clamp(min=1)).item(),
            "val_loss_mask": (sums[2] / sums[3].clamp(min=1)).item(),
            **summarize_metrics(counts, block_size)}


# -------------------------------------------------------------------------------------------------
# distributed

def set_gate(model, is_mask):
    """Turn a model's gated adapters (lora.py) on at the mask positions of its next forward; a no-op
    for a model without them."""
    gate = getattr(unwrap(model), "next_block_gate", None)
    if gate is not None:
        gate.mask = is_mask


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def decoder_layers(model):
    """The model's decoder layers (its _no_split_modules), also once FSDP2 has renamed their
    class."""
    names = set(getattr(unwrap(model), "_no_split_modules", None) or [])
    return [m for m in unwrap(model).modules() if any(c.__name__ in names for c in type(m).__mro__)]


def parallelize(model, parallel, device, param_dtype, mesh):
    """DDP, or FSDP2 over the mesh's "dp" ranks (each decoder layer, then the root: the tied
    embedding and lm_head stay together in the root group; params in param_dtype, gradients reduced
    in fp32). One process, or tensor parallel alone: the model as it is."""
    if mesh is None or mesh["dp"].size() == 1:
        return model
    if parallel == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                       else None)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    dp = mesh["dp"] if mesh["tp"].size() > 1 else None  # 1-D: FSDP's own mesh of every rank
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=dp, mp_policy=policy)
    fully_shard(model, mesh=dp, mp_policy=policy)
    return model


# tensor parallel: the styles of Hugging Face's base_model_tp_plan that train.py applies
TP_STYLES = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}


def tp_plan(config, tp):
    """(plan for parallelize_module relative to a decoder layer, names of the modules whose weights
    see the local heads only: their gradients are summed over the TP ranks) from the model's own
    base_model_tp_plan; one line saying why when tp cannot shard this model."""
    config = config.get_text_config()
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        raise UserError(f"tensor_parallel={tp}: model type {config.model_type!r} has no tensor "
                        "parallel plan (config.base_model_tp_plan): use tensor_parallel=1")
    styles, partial = {}, []
    for key, style in plan.items():
        name = key.split("layers.*.", 1)[-1]
        if not key.startswith("layers.*."):  # embeddings and lm_head stay whole: always right
            continue
        if style in TP_STYLES:
            styles[name] = TP_STYLES[style]
        elif style == "replicated_with_grad_allreduce":
            partial.append(name)
        else:
            raise UserError(f"tensor_parallel={tp}: {config.model_type}'s plan shards {key!r} as "
                            f"{style!r}, which train.py does not apply: use tensor_parallel=1")
    sizes = {"num_attention_heads": config.num_attention_heads,
             "num_key_value_heads": getattr(config, "num_key_value_heads", None),
             "intermediate_size": getattr(config, "intermediate_size", None)}
    for key, size in sizes.items():
        if size is not None and size % tp:
            raise UserError(f"tensor_parallel={tp} does not divide the model's {key}={size}: "
                            "choose a tensor_parallel that does")
    return styles, partial


def tensor_parallelize(model, tp_mesh):
    """Shard each decoder layer's attention and MLP projections over the TP ranks, by the model's
    plan (ColwiseParallel on q/k/v/gate/up, RowwiseParallel on o/down): each rank holds its share of
    the heads and of the MLP, and of their activations. Embeddings, norms and lm_head stay whole.
    Adapters (lora.py) are attached after this, sharded alike."""
    styles, partial = tp_plan(model.config, tp_mesh.size())
    for layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, {name: style() for name, style in styles.items()})
    model.next_block_tp = (tp_mesh, partial)  # what sum_partial_grads needs
    return model


def sum_partial_grads(model):
    """Sum over the TP ranks the gradients of weights that see the local heads only (Qwen3's q_norm
    and k_norm): each rank holds a part of their sum. Call after the last backward of a step."""
    tp_mesh, partial = getattr(unwrap(model), "next_block_tp", (None, []))
    for layer in decoder_layers(model) if partial else []:
        for name in partial:
            for p in layer.get_submodule(name).parameters():
                if p.grad is not None:
                    grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                    dist.all_reduce(grad, group=tp_mesh.get_group())


def clip_grads(model, max_norm):
    """Clip the global gradient norm to max_norm (0: no clipping); returns the norm before
    clipping, as a float (nan or inf when a gradient is not finite). Gradients that live on
    different meshes (FSDP x TP, FSDP alone) are normed on their own mesh, then combined."""
    limit = max_norm if max_norm > 0 else float("inf")
    params = [p for p in model.parameters() if p.grad is not None]
    meshes = {}
    for p in params:
        meshes.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    if len(meshes) <= 1:
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()
    norms = [torch.nn.utils.get_total_norm([p.grad for p in group]) for group in meshes.values()]
    norm = torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n
                                                 for n in norms]))
    for group in meshes.values():
        torch.nn.utils.clip_grads_with_norm_(group, limit, norm)
    return norm.item()


def all_finite(model, device):
    """Whether every weight of the model is finite, on every rank."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return all_true(all(bool(torch.isfinite(p).all()) for p in local), device)


def set_grad_sync(model, enabled):
    """Gradients are reduced across ranks only on the last micro-step of an optimizer step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = enabled


# -------------------------------------------------------------------------------------------------
# throughput accounting

PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
              "4090": 165e12}


def peak_flops(device):
    """Dense bf16 peak of known GPUs (None elsewhere, so that MFU is not reported)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def flops_per_token(model, seq_len):
    """Training FLOPs per token: 6 x non-embedding params + attention (causal, 6 x layers x width x
    seq)."""
    cfg = unwrap(model).config
    params = sum(p.numel() for p in unwrap(model).parameters())
    params -= unwrap(model).get_input_embeddings().weight.numel() * (not cfg.tie_word_embeddings)
    width = cfg.num_attention_heads * getattr(cfg, "head_dim",
                                              cfg.hidden_size // cfg.num_attention_heads)
    return 6 * params + 6 * cfg.num_hidden_layers * width * seq_len
