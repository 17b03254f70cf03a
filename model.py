"""
model.py: the model side of next-block training, for any Hugging Face causal LM.

  training_tokenizer  the tokenizer of an HF folder (init_from=PATH) or the demo's, with the mask
                      token added
  load_model          the model of that folder (or the tiny demo model), the mask token's embedding
                      row ready, the attention backend chosen
  add_mask_token      a dedicated <|mask|> token; init_mask_row: spare rows reused, never shrunk,
                      mean-initialised
  attention_mask      a batch's rule (mask.py) as the backend wants it: BlockMask (flex) or dense
                      bool (sdpa)
  forward_losses      per-token cross-entropy and argmax at supervised positions, logits in chunks
  parallelize         DDP, or FSDP2 (fully_shard per decoder layer, then the root with the tied
                      embeddings)
  peak_flops          what MFU is measured against
(The checkpoint format, HF export included, is checkpoint.py's.)
"""

import inspect
import os

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config
from transformers.utils import logging as hf_logging

from configurator import UserError, one_of
from mask import block_mask, dense_mask

MASK_TOKEN = "<|mask|>"
TOKENIZER_FILES = {
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
    "spiece.model"
}
hf_logging.disable_progress_bar()  # loading and saving tiny models should not draw progress bars


# -------------------------------------------------------------------------------------------------
# the demo model and tokenizer (built from code: no download)

DEMO_SPECIAL = [
    "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<think>", "</think>"
]
# Phi-3 style turns; the generation prompt opens a <think> block, as the R1 distills' does
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n<think>\n{% endif %}"
)


def demo_tokenizer():
    """A character-level PreTrainedTokenizerFast: printable ASCII and newline, one token each, plus
    special tokens for the chat turns and the think block. Its generation prompt ends with
    `<think>\\n`."""
    chars = ["<|unk|>", "\n"] + [chr(c) for c in range(32, 127)]
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<|unk|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", additional_special_tokens=DEMO_SPECIAL[1:],
        chat_template=DEMO_CHAT_TEMPLATE, model_max_length=1 << 30
    )


def demo_config(vocab_size=128, hidden_size=128, num_layers=4, num_heads=4, **overrides):
    """A tiny Qwen3 (RMSNorm, RoPE, GQA, tied embeddings): the same code paths as the real ones."""
    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=max(1, num_heads // 2), head_dim=hidden_size // num_heads,
                  max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=10000.0)
    kwargs.update(overrides)
    return Qwen3Config(**kwargs)


# -------------------------------------------------------------------------------------------------
# loading

def attention_backend(attention, device):
    """'flex_attention' (BlockMask) on CUDA, 'sdpa' (dense bool mask) elsewhere;
    attention='flex'|'sdpa' forces."""
    one_of("attention", attention, ("auto", "flex", "sdpa"))
    if attention == "auto":
        attention = "flex" if torch.device(device).type == "cuda" else "sdpa"
    return "flex_attention" if attention == "flex" else "sdpa"


def add_mask_token(tokenizer):
    """(mask token id, added?): the dedicated mask token (never EOS), added to the tokenizer unless
    it has it already (a checkpoint of ours)."""
    if MASK_TOKEN in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(MASK_TOKEN), False
    tokenizer.add_tokens(
        [AddedToken(MASK_TOKEN, special=True, normalized=False)], special_tokens=True
    )
    return tokenizer.convert_tokens_to_ids(MASK_TOKEN), True


def init_mask_row(model, mask_id):
    """Give a new mask token its embedding row: a spare row when the matrix is larger than the
    tokenizer (Qwen pads its vocab), else the matrix grows; it never shrinks. The input (and untied
    output) row starts at the mean of the rows before it, the same on every rank."""
    if mask_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(mask_id + 1, pad_to_multiple_of=64, mean_resizing=False)
    with torch.no_grad():
        for weight in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            weight[mask_id] = weight[:mask_id].float().mean(0).to(weight.dtype)


def load_tokenizer(path):
    """The tokenizer saved in a model folder, or one clear error."""
    # transformers quietly builds an empty tokenizer for a folder without one: look for its files
    # first
    if not TOKENIZER_FILES & set(os.listdir(path)):
        raise UserError(
            f"{path}: no tokenizer in the model folder (none of "
            f"{', '.join(sorted(TOKENIZER_FILES))})"
            ": save the tokenizer beside the model"
        )
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None


def training_tokenizer(init_from):
    """(tokenizer, mask token id, mask token new?) of a local HF folder or 'demo', the mask token
    added."""
    if init_from == "demo":
        tokenizer = demo_tokenizer()
    else:
        if not os.path.isdir(init_from):
            raise UserError(
                f"init_from={init_from!r} is not a folder (a local Hugging Face model, or 'demo'; "
                "nothing is downloaded)"
            )
        if not os.path.exists(os.path.join(init_from, "config.json")):
            raise UserError(f"{init_from}: no config.json, not a Hugging Face model folder")
        tokenizer = load_tokenizer(init_from)
    return (tokenizer, *add_mask_token(tokenizer))


def load_model(init_from, mask_id, new_mask, device="cpu", attention="auto", demo_overrides=None):
    """The model in fp32 on device (init_from: a local HF folder, or 'demo'), its mask token's row
    ready."""
    backend = attention_backend(attention, device)
    if init_from == "demo":
        model = AutoModelForCausalLM.from_config(demo_config(**(demo_overrides or {})),
                                                 attn_implementation=backend, dtype=torch.float32)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(init_from, attn_implementation=backend,
                                                         dtype=torch.float32)
        except (OSError, ValueError) as e:  # e.g. a folder with config.json but no weights
            raise UserError(
                f"{init_from}: cannot load the model ({str(e).strip().splitlines()[0]})"
            ) from None
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


def forward_losses(model, batch, chunk_tokens=None):
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
    chunk = chunk_tokens or max(256, (2**27 if weight.is_cuda else 2**24) // weight.shape[0])
    losses, preds = [], []
    for i in range(0, len(labels), chunk):
        args = (hidden[i:i + chunk], weight, labels[i:i + chunk])
        loss, pred = checkpoint(_ce_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() \
            else _ce_chunk(*args)
        losses.append(loss)
        preds.append(pred)
    empty = hidden.new_zeros(0, dtype=torch.float32)
    return (
        torch.cat(losses) if losses else empty + hidden.sum() * 0,  # keeps the graph if empty
        torch.cat(preds) if preds else labels,
        batch["is_mask"][supervised],
    )


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
    names = set(getattr(unwrap(model), "_no_split_modules", None) or [])
    return [m for m in unwrap(model).modules() if type(m).__name__ in names]


def parallelize(model, parallel, device, param_dtype, world_size):
    """DDP, or FSDP2 (each decoder layer, then the root: the tied embedding and lm_head stay
    together in the root group; params in param_dtype, gradients reduced in fp32). One process: the
    model as it is.
    """
    if world_size == 1:
        return model
    one_of("parallel", parallel, ("ddp", "fsdp"))
    if parallel == "ddp":
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def set_grad_sync(model, enabled):
    """Gradients are reduced across ranks only on the last micro-step of an optimizer step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = enabled


# -------------------------------------------------------------------------------------------------
# throughput accounting

PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "4090": 165e12,
}


def peak_flops(device):
    """Dense bf16 peak of known GPUs (None elsewhere, so MFU is not reported)."""
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
    width = cfg.num_attention_heads * getattr(
        cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads
    )
    return 6 * params + 6 * cfg.num_hidden_layers * width * seq_len
