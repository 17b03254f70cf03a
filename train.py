"""
Next-block SFT of a Hugging Face causal LM: one flat loop, config as module globals (nanoGPT style).

  python train.py                                            # the CPU demo: synthetic data, tiny model, ~2 min
  python train.py config/finetune_1gpu.py --init_from=/models/Qwen3-0.6B
  torchrun --standalone --nproc_per_node=4 train.py config/seed_recipe.py
  torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR \\
      --master_port=29500 train.py config/seed_recipe.py      # out_dir on a file system all nodes share

Re-running the same command resumes from the newest complete checkpoint in out_dir (resume='auto').
"""
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------------------------
# config: the defaults are the CPU demo; the seed's name for each key in [brackets]
# I/O
out_dir = "out/demo"                      # checkpoints and metrics.jsonl [trainer.default_local_dir]
init_from = "demo"                        # a local Hugging Face model folder, or "demo" [model.partial_pretrain]
resume = "auto"                           # 'auto': go on from the newest complete checkpoint; 'disable' [trainer.resume_mode]
save_every = 0                            # steps between checkpoints; 0: at the end only [trainer.save_checkpoint_steps]
keep_last = 3                             # checkpoints kept in out_dir, newest first [trainer.max_ckpt_to_keep]
log_every = 10                            # steps between console lines / metrics.jsonl rows [trainer.logger: console]
eval_every = 0                            # steps between validations on val_files; 0: only at the end
wandb_log = False                         # log to Weights & Biases (falls back to offline mode) [trainer.logger: wandb]
wandb_project = "next-block"              # wandb project [trainer.project_name]
wandb_run_name = ""                       # wandb run name; '' = the name of out_dir [trainer.experiment_name]
# data
train_files = "data/demo/train.parquet"   # parquet path, glob or list [data.train_files]
val_files = "data/demo/test.parquet"      # parquet for validation; None: no validation [data.val_files]
prompt_key = "prompt"                     # prompt column [data.prompt_key]
response_key = "target"                   # response column [data.response_key]
prompt_format = None                      # e.g. 'Question: {prompt}\nAnswer: ' for tokenizers without a chat template
demo_data = True                          # write the demo's data set when train/val_files are data/demo/ and missing
max_length = 256                          # tokens per packed row, masks included [data.max_length]
block_size = 4                            # tokens predicted per forward pass [data.block_size]
layout = "split"                          # 'split' (faster) or 'interleaved' (the seed's): same math, DESIGN.md 2
block_offset = "random"                   # 'random' (per sample and epoch) or a fixed int in [0, block_size-1]
mask_loss_weight = 1.0                    # weight of the mask (offset >= 1) tokens in the loss
# optimization
batch_size = 16                           # samples per micro-batch per device [data.micro_batch_size_per_gpu]
# micro-batches per optimizer step over all ranks (nanoGPT); the seed counted per GPU [optim.gradient_accumulation_steps]
gradient_accumulation_steps = 1
learning_rate = 6e-3                      # peak learning rate [optim.lr]
min_lr = 6e-4                             # learning rate at the end of the cosine decay
warmup_ratio = 0.05                       # fraction of the steps spent warming up linearly [optim.warmup_steps_ratio]
weight_decay = 0.01                       # AdamW decay on 2-D weights (betas 0.9, 0.95) [their code: 0.01]
grad_clip = 1.0                           # clip the global grad norm to this; 0: no clipping [optim.clip_grad]
epochs = 4                                # passes over train_files [trainer.total_epochs]
max_steps = 0                             # optimizer steps; 0: epochs x steps per epoch [trainer.total_training_steps]
gradient_checkpointing = False            # recompute activations in backward [model.enable_gradient_checkpointing]
# model: the demo's tiny Qwen3 (init_from="demo" only)
n_layer = 4                               # decoder layers
n_embd = 128                              # hidden size
n_head = 4                                # attention heads
# system
device = "auto"                           # 'auto' (cuda if available, else cpu), 'cpu', 'cuda'
dtype = "auto"                            # 'auto' (bfloat16 on CUDA, float32 on CPU), 'bfloat16', 'float32'
compile = False                           # torch.compile each decoder layer
attention = "auto"                        # 'auto' (flex on CUDA, else sdpa), 'flex' (BlockMask), 'sdpa' (dense mask)
parallel = "fsdp"                         # with several ranks: 'fsdp' (FSDP2) or 'ddp' [their trainer: FSDP]
seed = 1337                               # model init (demo), data order, block offsets
# ---------------------------------------------------------------------------------------------------------------
from configurator import UserError, configure  # noqa: E402

config = configure(globals())
# ---------------------------------------------------------------------------------------------------------------
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402

import data  # noqa: E402
from model import (attention_backend, checkpoints, decoder_layers, export_hf, flops_per_token,  # noqa: E402
                   forward_losses, load_model, parallelize, peak_flops, set_grad_sync)


def compute_init():
    """Rank, world and device from torchrun's variables (a plain `python train.py` is rank 0 of 1)."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    name = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device='cuda' but no CUDA device is visible")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def compute_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if rank == 0:
        print(*args, **kwargs, flush=True)


def all_sum(t):
    if world > 1:
        dist.all_reduce(t)
    return t


def barrier():
    if world > 1:
        dist.barrier()


# settings checked before anything waits for the other ranks
world = int(os.environ.get("WORLD_SIZE", 1))
if gradient_accumulation_steps % world:
    raise UserError(f"gradient_accumulation_steps={gradient_accumulation_steps} must be divisible by the "
                    f"{world} ranks (it counts micro-batches over all ranks)")
micro_steps = gradient_accumulation_steps // world
if block_offset != "random":
    try:
        block_offset = int(block_offset)
    except ValueError:
        raise UserError(f"block_offset must be 'random' or an int, got {block_offset!r}") from None
if resume not in ("auto", "disable"):
    raise UserError(f"resume must be 'auto' or 'disable', got {resume!r}")
if dtype not in ("auto", "float32", "bfloat16"):
    raise UserError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")

rank, world, device = compute_init()
master = rank == 0
torch.manual_seed(seed)
if dtype == "auto":
    dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
ptdtype = getattr(torch, dtype)
print0(f"train.py | world {world} ({parallel if world > 1 else 'single process'}) | device {device} | "
       f"dtype {dtype} | out_dir {out_dir}")

# refuse early an out_dir that holds another run: resuming it would mix two trainings
existing = checkpoints(out_dir)
if existing and resume == "auto":
    with open(os.path.join(existing[-1][1], "checkpoint.json")) as f:
        theirs = json.load(f)["config"]
    clash = [k for k in ("init_from", "block_size") if theirs.get(k) != config[k]]
    if clash:
        theirs_text = ", ".join(f"{k}={theirs.get(k)!r}" for k in clash)
        ours_text = ", ".join(f"{k}={config[k]!r}" for k in clash)
        raise UserError(f"out_dir {out_dir!r} holds another run ({theirs_text}, this one has {ours_text}): use "
                        "another out_dir, or --resume=disable to start over there (its checkpoints get replaced)")

# ---------------------------------------------------------------------------------------------------------------
# data and model
if demo_data and master:
    demo_files = [f for f in [train_files, val_files] if isinstance(f, str) and f.startswith("data/demo/")]
    if demo_files and not all(os.path.exists(f) for f in demo_files):
        print0("demo: writing the synthetic data set to data/demo/")
        data.write_demo_data("data/demo")
barrier()
train_rows = data.load_samples(train_files, prompt_key, response_key)
val_rows = data.load_samples(val_files, prompt_key, response_key) if val_files else []

torch.manual_seed(seed)
demo_overrides = dict(hidden_size=n_embd, num_layers=n_layer, num_heads=n_head)
model, tokenizer, mask_token_id = load_model(init_from, device, attention, demo_overrides)
model.config.next_block_size = block_size  # exported with the model: sample.py decodes with it
attn_impl = attention_backend(attention, device)
if attn_impl == "flex_attention" and device.type != "cuda":
    raise UserError("attention='flex' needs CUDA: FlexAttention has no backward on CPU (use attention='sdpa')")
pad_multiple = 128 if attn_impl == "flex_attention" else 8  # flex: few shapes to compile; sdpa: little padding

train_samples, dropped, truncated = data.drop_too_long(data.encode_samples(tokenizer, train_rows, prompt_format),
                                                       max_length, block_size)
val_samples = data.drop_too_long(data.encode_samples(tokenizer, val_rows, prompt_format), max_length,
                                 block_size)[0]
if not train_samples:
    raise UserError(f"no training samples left: every prompt in {train_files!r} is longer than "
                    f"max_length={max_length}")
print0(f"data: {len(train_samples)} train samples ({dropped} dropped: prompt >= max_length; up to {truncated} "
       f"responses cut to fit max_length={max_length}), {len(val_samples)} val samples | block_size {block_size} "
       f"| layout {layout}")
batches = data.Batches(train_samples, batch_size, micro_steps, max_length, block_size, mask_token_id, layout,
                       block_offset, seed, rank, world, pad_multiple=pad_multiple, pad_id=mask_token_id)
total_steps = max_steps or epochs * batches.steps_per_epoch
print0(f"steps: {total_steps} of {batch_size * gradient_accumulation_steps} samples "
       f"({batch_size} per micro-batch x {micro_steps} micro-steps x {world} ranks); "
       f"{batches.steps_per_epoch} steps per epoch")

if gradient_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if compile:
    for layer in decoder_layers(model):
        layer.compile()
n_params = sum(p.numel() for p in model.parameters())
flops_token = flops_per_token(model, max_length)
model = parallelize(model, parallel, device, ptdtype, world)
autocast = torch.autocast(device.type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate, betas=(0.9, 0.95),
                              fused=device.type == "cuda")
print0(f"model: {init_from} | {n_params / 1e6:.2f}M params | attention {attn_impl} | mask token id {mask_token_id}")


def get_lr(step):
    """Linear warmup over warmup_ratio of the steps, then cosine decay to min_lr."""
    warmup = int(warmup_ratio * total_steps)
    if step < warmup:
        return learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * (learning_rate - min_lr)


def to_device(batch):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------------------------------
# checkpoints: out_dir/global_step_N/{huggingface/, state/, checkpoint.json}, valid only once renamed from .tmp

def rng_state():
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(step, metrics):
    import torch.distributed.checkpoint as dcp
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process: expected
    final = os.path.join(out_dir, f"global_step_{step}")
    tmp = final + ".tmp"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    export_hf(model, tokenizer, os.path.join(tmp, "huggingface"), master, dtype=ptdtype)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(tmp, "state"))
    # per-rank files: DCP would keep one copy of a non-tensor object saved under the same key by every rank
    torch.save({"rng": rng_state(), "data": batches.state_dict()}, os.path.join(tmp, "state", f"rank{rank}.pt"))
    barrier()
    if master:
        sidecar = {"step": step, "world_size": world, "metrics": metrics, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "config": config}
        with open(os.path.join(tmp, "checkpoint.json"), "w") as f:
            json.dump(sidecar, f, indent=1, default=str)
        shutil.rmtree(final, ignore_errors=True)  # the same step of a run that resume='disable' replaces
        os.replace(tmp, final)
        for _, old in checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
        print0(f"saved {final}")
    barrier()


def load_checkpoint(path):
    import torch.distributed.checkpoint as dcp
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=os.path.join(path, "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    mine = os.path.join(path, "state", f"rank{rank}.pt")
    if os.path.exists(mine):
        extra = torch.load(mine, weights_only=False)
        set_rng_state(extra["rng"])
    else:  # the checkpoint was written by fewer ranks: rank 0's data position holds for all
        print0(f"note: {path} was written by fewer ranks; random state restarts on the new ranks")
        extra = torch.load(os.path.join(path, "state", "rank0.pt"), weights_only=False)
    batches.load_state_dict(extra["data"])
    with open(os.path.join(path, "checkpoint.json")) as f:
        return json.load(f)["step"]


step = 0
if existing and resume == "auto":
    step = load_checkpoint(existing[-1][1])
    print0(f"resumed from {existing[-1][1]} (step {step}, epoch {batches.epoch})")
elif existing:
    print0(f"note: resume='disable': starting over; the {len(existing)} checkpoints in {out_dir} get replaced")
if step >= total_steps:
    print0(f"nothing to do: {out_dir} already holds step {step} of {total_steps} (raise max_steps or epochs to go on)")

# ---------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate():
    """val_loss_ar, val_loss_mask, acc@0..B-1 and tpf_tf over all of val_files (block offset 0)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    counts = torch.zeros(2 * block_size + 2, dtype=torch.float64)
    for batch in data.eval_batches(val_samples, batch_size, max_length, block_size, mask_token_id, layout, rank,
                                   world, pad_multiple, mask_token_id):
        batch = to_device(batch)
        with autocast:
            losses, preds, is_mask = forward_losses(model, batch)
        sums += torch.tensor([losses[~is_mask].sum().item(), (~is_mask).sum().item(),
                              losses[is_mask].sum().item(), is_mask.sum().item()], dtype=torch.float64)
        full_pred = batch["labels"].clone()
        full_pred[batch["labels"] != -100] = preds
        counts += data.block_metrics(full_pred.cpu(), {k: v.cpu() for k, v in batch.items()}, block_size)
    sums, counts = all_sum(sums.to(device)).cpu(), all_sum(counts.to(device)).cpu()
    model.train()
    out = {"val_loss_ar": (sums[0] / sums[1].clamp(min=1)).item(),
           "val_loss_mask": (sums[2] / sums[3].clamp(min=1)).item()}
    out.update(data.summarize_metrics(counts, block_size))
    return out


def log_json(row):
    if master:
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# the loop
os.makedirs(out_dir, exist_ok=True)
run = None
if wandb_log and master:
    import wandb
    name = wandb_run_name or os.path.basename(os.path.normpath(out_dir))
    try:
        run = wandb.init(project=wandb_project, name=name, config=config, dir=out_dir)
    except Exception as e:  # no network or no API key: keep training, log offline
        print0(f"wandb: {str(e).splitlines()[0]}; logging offline to {out_dir}/wandb")
        run = wandb.init(project=wandb_project, name=name, config=config, dir=out_dir, mode="offline")

stop_requested = False


def request_stop(signum, frame):
    global stop_requested
    stop_requested = True


signal.signal(signal.SIGTERM, request_stop)  # preemption: save a checkpoint at the end of this step, then exit 0
model.train()
peak = peak_flops(device)
from tqdm import tqdm  # noqa: E402

bar = tqdm(total=total_steps, initial=step, disable=not (master and sys.stderr.isatty()), dynamic_ncols=True)


def log_line(line):
    """A console line on rank 0, printed above the progress bar when there is one."""
    if bar.disable:
        print0(line)
    else:
        bar.write(line)


metrics = {}
t0 = time.time()
while step < total_steps:
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    micro = batches.next()
    # the loss is a sum over every supervised position of this optimizer step on every rank, divided by their
    # number: accumulation and world size never change the math (DESIGN.md section 3)
    supervised = all_sum(torch.tensor(float(sum((b["labels"] != -100).sum() for b in micro)), device=device))
    stats = torch.zeros(8, dtype=torch.float64, device=device)
    for k, batch in enumerate(micro):
        set_grad_sync(model, k == len(micro) - 1)
        batch = to_device(batch)
        with autocast:
            losses, _, is_mask = forward_losses(model, batch)
        weighted = (losses * torch.where(is_mask, mask_loss_weight, 1.0)).sum()
        # x world: DDP and FSDP average gradients over ranks, and this loss is already global
        (weighted * (world / supervised)).backward()
        real = batch["doc_ids"] >= 0
        stats[:7] += torch.stack([x.detach().double() for x in (
            weighted, losses[~is_mask].sum(), (~is_mask).sum(), losses[is_mask].sum(),
            is_mask.sum(), (real & ~batch["is_mask"]).sum(), real.sum())])
    stats[7] = float(stop_requested)  # every rank learns of a SIGTERM that reached any of them
    stats = all_sum(stats)
    loss_sum, ar_sum, ar_n, mask_sum, mask_n, clean_tokens, all_tokens, stop_votes = stats.tolist()
    loss_value = loss_sum / supervised.item()
    if not math.isfinite(loss_value):
        last = (checkpoints(out_dir) or [(0, "none")])[-1][1]
        raise UserError(f"loss is {loss_value} at step {step + 1}: stopping without saving (newest checkpoint: "
                        f"{last}); lower learning_rate or check the data")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    bar.update(1)

    dt, t0 = time.time() - t0, time.time()
    metrics = {"step": step, "loss": loss_value, "loss_ar": ar_sum / max(ar_n, 1),
               "loss_mask": mask_sum / max(mask_n, 1), "lr": lr, "grad_norm": grad_norm.item(),
               "tokens_per_sec": all_tokens / dt, "clean_tokens_per_sec": clean_tokens / dt, "epoch": batches.epoch}
    if peak:
        metrics["mfu"] = flops_token * all_tokens / dt / (peak * world)
    bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{all_tokens / dt:.0f}")
    if step % log_every == 0 or step == total_steps:
        mfu = f" | mfu {100 * metrics['mfu']:.0f}%" if peak else ""
        line = (f"step {step}/{total_steps} | loss {loss_value:.4f} (ar {metrics['loss_ar']:.3f}, mask "
                f"{metrics['loss_mask']:.3f}) | lr {lr:.1e} | grad_norm {metrics['grad_norm']:.2f} | "
                f"{all_tokens / dt / 1e3:.1f}k tok/s{mfu}")
        log_line(line)
        log_json(metrics)
        if run:
            run.log(metrics, step=step)
    if val_samples and ((eval_every and step % eval_every == 0) or step == total_steps):
        val = evaluate()
        metrics.update(val)
        accs = " ".join(f"{val[f'acc@{k}']:.2f}" for k in range(block_size))
        line = (f"eval step {step} | val_loss_ar {val['val_loss_ar']:.4f} | val_loss_mask {val['val_loss_mask']:.4f}"
                f" | acc@0..{block_size - 1} {accs} | tpf_tf {val['tpf_tf']:.2f}")
        log_line(line)
        log_json({"step": step, **val})
        if run:
            run.log(val, step=step)
        t0 = time.time()  # validation time is not training throughput
    if (save_every and step % save_every == 0) or step == total_steps or stop_votes > 0:
        save_checkpoint(step, metrics)
        t0 = time.time()
    if stop_votes > 0:
        print0(f"SIGTERM: saved step {step}, exiting")
        break

bar.close()
if run:
    run.finish()
compute_cleanup()
