"""
Next-block SFT of a Hugging Face causal LM: one flat loop, config as module globals (nanoGPT style).

  python train.py                                 # the CPU demo: synthetic data, tiny model, ~2 min
  python train.py config/finetune_1gpu.py --init_from=/models/Qwen3-0.6B
  torchrun --standalone --nproc_per_node=4 train.py config/seed_recipe.py
  torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR \\
      --master_port=29500 train.py config/seed_recipe.py  # out_dir on a file system all nodes share
  python train.py config/seed_recipe.py --data_only=True  # tokenize the data before a launch

Re-running the same command resumes from the newest complete checkpoint in out_dir (resume='auto').
SIGTERM, SIGHUP or Ctrl-C: save a checkpoint at the end of the step, then exit 0 (Ctrl-C twice:
abort).
"""
# configurator first: from here on a mistake, or a Ctrl-C while torch loads, prints one line
from configurator import UserError, check_train, configure, first_line
import json
import math
import os
import signal
import sys
import time
import uuid
from contextlib import nullcontext

import torch
from tqdm import tqdm

import chat
import checkpoint
import data
import lora
from common import (all_sum, barrier, compute_cleanup, compute_init, device_mesh, dist_info,
                    print0, resolve_dtype, to_device)
from demo import write_demo_data
from mask import row_multiple
from model import (all_finite, attention_backend, clip_grads, decoder_layers, evaluate,
                   flops_per_token, forward_losses, load_config, load_model, parallelize,
                   peak_flops, set_grad_sync, sum_partial_grads, tensor_parallelize, tp_plan)
from store import Store, load_store

# -------------------------------------------------------------------------------------------------
# config: the defaults are the CPU demo; the seed's name for a key in [brackets]
# I/O
out_dir = "out/demo"             # checkpoints, metrics.jsonl [trainer.default_local_dir]
init_from = "demo"               # a local Hugging Face model folder, or "demo" [partial_pretrain]
resume = "auto"                  # 'auto': the newest complete checkpoint; 'disable': start over,
#                                  moving the old run to out_dir/previous_runs/ [resume_mode]
save_every = 0                   # steps between checkpoints; 0: at the end [save_checkpoint_steps]
keep_last = 3                    # checkpoints kept, newest first; 0: all [max_ckpt_to_keep]
log_every = 10                   # steps between console lines and metrics.jsonl rows
eval_every = 0                   # steps between validations on val_files; 0: at the end only
log_samples = False              # append each step's sample ids to out_dir/samples.jsonl (audits)
wandb_log = False                # log to Weights & Biases (offline without a network or key)
wandb_project = "next-block"     # wandb project [trainer.project_name]
wandb_run_name = ""              # wandb run name; '' = the name of out_dir [experiment_name]
# data
train_files = "data/demo/train.parquet"  # .parquet, .jsonl, .json (+ .gz, .zst), .arrow, or a
#                                  datasets save_to_disk folder; a glob or a list [data.train_files]
val_files = "data/demo/test.parquet"     # the same, for validation; None: no validation
prompt_key = "prompt"            # prompt column [data.prompt_key]
response_key = "target"          # response column [data.response_key]
messages_key = "messages"        # whole-conversation column (else 'conversations' is read)
tools_key = "tools"              # tool schemas column, handed to the chat template
data_format = "auto"             # rows: 'auto' (by column), 'prompt_target', 'messages' (OpenAI
#                                  role/content) or 'sharegpt' (from/value)
skip_bad_rows = False            # skip malformed rows (counted, saved in checkpoint.json) instead
#                                  of stopping at the first
chat_template_kwargs = {}        # options for every chat template render: {"enable_thinking": True}
prompt_format = None             # 'Question: {prompt}\nAnswer: ' for tokenizers without a template
special_text = "keep"            # special-token text in messages: 'keep' as text, or 'drop' the row
data_cache = "~/.cache/next-block"  # where tokenized data is kept (docs/design.md, The data path)
data_workers = 0                 # processes that tokenize on the first start; 0: every core
data_only = False                # tokenize train_files and val_files into data_cache, then exit
demo_data = True                 # write the demo's data set when its files are missing
max_length = 256                 # tokens per packed row, masks included [data.max_length]
block_size = 4                   # tokens predicted per forward pass [data.block_size]
layout = "split"                 # 'split' (faster) or 'interleaved' (the seed's): the same math
block_offset = "random"          # 'random' (per turn and epoch) or an int in [0, block_size-1]
mask_loss_weight = 1.0           # weight of the mask tokens in the loss; 0: plain SFT
# optimization
batch_size = 16                  # samples per micro-batch per device [micro_batch_size_per_gpu]
batch_tokens = 0                 # instead: tokens per micro-batch per device, masks included
gradient_accumulation_steps = 1  # micro-batches per step over all ranks (nanoGPT's meaning; the
#                                  seed counted per GPU) [optim.gradient_accumulation_steps]
learning_rate = 6e-3             # peak learning rate [optim.lr]
min_lr = 6e-4                    # learning rate at the end of the cosine decay
warmup_ratio = 0.05              # fraction of the steps warming up linearly [warmup_steps_ratio]
weight_decay = 0.01              # AdamW decay on 2-D weights (betas 0.9, 0.95)
grad_clip = 1.0                  # clip the global grad norm to this; 0: no clipping [clip_grad]
max_nonfinite = 3                # steps in a row with a non-finite loss or grad norm (each skipped)
#                                  before the run stops
epochs = 4                       # passes over train_files [trainer.total_epochs]
max_steps = 0                    # optimizer steps; 0: epochs x steps per epoch
gradient_checkpointing = False   # recompute activations in backward [enable_gradient_checkpointing]
finetune = "full"                # 'full': every weight; 'gated_lora': base frozen (lora.py)
lora_rank = 16                   # gated_lora: rank of each adapter
lora_alpha = 32.0                # gated_lora: the adapters' output is scaled by alpha / rank
lora_targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # adapted linears
# model: the demo's tiny Qwen3 (init_from="demo" only)
n_layer = 4                      # decoder layers
n_embd = 128                     # hidden size
n_head = 4                       # attention heads
# system
device = "auto"                  # 'auto' (cuda if available, else cpu), 'cpu', 'cuda'
dtype = "auto"                   # 'auto' (bfloat16 on CUDA, else float32), 'bfloat16', 'float32'
compile = False                  # torch.compile each decoder layer
attention = "auto"               # 'auto' (flex on CUDA, else sdpa), 'flex' (BlockMask), 'sdpa'
parallel = "fsdp"                # with several ranks: 'fsdp' (FSDP2) or 'ddp'
tensor_parallel = 1              # ranks (of a node) sharding each layer: TP x FSDP on a 2-D mesh
#                                  [model.tensor_parallel_size]
seed = 1337                      # model init (demo), data order, block offsets
# -------------------------------------------------------------------------------------------------
config = configure(globals())
check_train(config, dist_info()[2])  # every value, before anything slow happens
block_offset = block_offset if block_offset == "random" else int(block_offset)
demo_overrides = dict(hidden_size=n_embd, num_layers=n_layer, num_heads=n_head)
model_config = load_config(init_from, demo_overrides)  # not a causal LM: one line, before the data
if tensor_parallel > 1:  # the model's plan and sizes
    tp_plan(model_config, tensor_parallel)

# this process, and the out_dir it owns
rank, local_rank, world, device = compute_init(device)
master = rank == 0
ptdtype = resolve_dtype(dtype, device)
attn_impl = attention_backend(attention, device, training=True)
mesh = device_mesh(device, tensor_parallel)
dp, tp = world // tensor_parallel, tensor_parallel  # the ranks of a TP group read the same data
dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
micro_steps = gradient_accumulation_steps // dp
torch.manual_seed(seed)
layout_text = f" x tensor parallel {tp}" if tp > 1 else ""
print0(f"train.py | world {world} ({parallel if world > 1 else 'single process'}{layout_text}) | "
       f"device {device} | dtype {str(ptdtype)[6:]} | out_dir {out_dir}")
run_id = uuid.uuid4().hex[:8]
compared = ["init_from", "block_size", "seed", "finetune"]  # what a resumed run must keep
compared += ["n_layer", "n_embd", "n_head"] if init_from == "demo" else []
compared += ["lora_rank", "lora_targets"] if finetune == "gated_lora" else []
out_dir_lock, previous = checkpoint.prepare(out_dir, config, compared, run_id, device)

# data: tokenized once into a store (local rank 0 of each node builds it, the others wait)
if demo_data and master and any(str(f).startswith("data/demo/") and not os.path.exists(f)
                                for f in (train_files, val_files) if f):
    print0("demo: writing the synthetic data set to data/demo/")
    write_demo_data("data/demo")
barrier()
tokenizer, mask_token_id, new_mask = chat.training_tokenizer(init_from)
conversation = chat.Chat(tokenizer, chat_template_kwargs, prompt_format, special_text)
keys, cache = (prompt_key, response_key, messages_key, tools_key), os.path.expanduser(data_cache)
reading = dict(builder=local_rank == 0, wait=barrier, data_format=data_format,
               skip_bad_rows=skip_bad_rows)
train_store, data_key, built = load_store(train_files, conversation, cache, keys, data_workers,
                                          **reading)
val_store = (load_store(val_files, conversation, cache, keys, data_workers, **reading)[0]
             if val_files else Store.from_samples([]))
if previous and previous.get("data_key") not in (None, data_key):
    raise UserError(f"the training data changed since the checkpoints in {out_dir} were saved (the "
                    "files, the tokenizer, the chat template or its options): resume with the same "
                    "data, or --resume=disable to start over")
for note, (count, where) in train_store.info.get("notes", {}).items():
    print0(f"note: {count} rows: {chat.NOTES[note]} (first: {where})")
same_data = val_store.info.get("files") == train_store.info.get("files")  # said once, then
if "unknown_token" in val_store.info.get("notes", {}) and not same_data:
    count, where = val_store.info["notes"]["unknown_token"]
    print0(f"note: {count} rows of val_files: {chat.NOTES['unknown_token']} (first: {where})")
bad_rows = {"train": train_store.info.get("bad_rows", 0), "val": val_store.info.get("bad_rows", 0)}
stores = [("train_files", train_store)] + ([] if same_data else [("val_files", val_store)])
for name, store in stores:
    if store.info.get("bad_rows"):
        print0(f"skipped {store.info['bad_rows']} malformed rows of {name} (skip_bad_rows; first: "
               f"{store.info['bad'][0]})")
    rows_per_file = zip(store.info.get("files", []), store.info.get("file_rows", []))
    empty = [f for f, n in rows_per_file if not n]
    if empty:
        print0(f"note: {len(empty)} of the {name} files have no rows ({', '.join(empty[:3])})")
shared = sorted({os.path.realpath(f) for f in train_store.info.get("files", [])} &
                {os.path.realpath(f) for f in val_store.info.get("files", [])})
if shared:  # validation on what the model trains on measures memory, not generalization
    print0(f"warning: val_files and train_files share {len(shared)} file(s) ({shared[0]}"
           f"{', ...' if len(shared) > 1 else ''}): the validation numbers are on training data")
if not len(train_store):
    why = (f"every row was malformed and skipped ({bad_rows['train']} rows; first: "
           f"{train_store.info['bad'][0]})" if bad_rows["train"] else
           "every row was dropped (special_text='drop': special-token text in each)")
    raise UserError(f"no training samples in {train_files!r}: {why}")
keep, dropped, truncated = data.too_long(train_store, max_length, block_size)
train_samples = train_store.select(keep)
val_samples = val_store.select(data.too_long(val_store, max_length, block_size)[0])
if not len(train_samples):
    raise UserError(f"no training samples left: every prompt in {train_files!r} is longer than "
                    f"max_length={max_length}")
pad_multiple = row_multiple(attn_impl)  # flex: few shapes to compile
batches = data.Batches(train_samples, batch_size, micro_steps, max_length, block_size,
                       mask_token_id, layout, block_offset, seed, dp_rank, dp,
                       pad_multiple=pad_multiple, pad_id=mask_token_id, batch_tokens=batch_tokens)
total_steps = max_steps or epochs * batches.steps_per_epoch
found = f"built in {built:.1f} s" if built is not None else "found"
print0(f"data: {len(train_samples)} train samples, {int(train_samples.clean_lengths().sum()):,} "
       f"tokens ({found}: {cache}/{data_key}) | {dropped} dropped (prompt >= max_length), up to "
       f"{truncated} cut to fit max_length={max_length} | {len(val_samples)} val samples | "
       f"padding {100 * batches.padding():.1f}% | block_size {block_size} | layout {layout}")
per_micro = (f"micro-batches of {batch_tokens} tokens ({batches.rows} rows x {batches.row_length}"
             if batch_tokens else f"samples ({batch_size} per micro-batch")
count = gradient_accumulation_steps if batch_tokens else batch_size * gradient_accumulation_steps
print0(f"steps: {total_steps} of {count} {per_micro} x {micro_steps} micro-steps x {dp} ranks); "
       f"{batches.steps_per_epoch} steps per epoch")
if data_only:
    print0(f"data_only: the stores are in {cache}; launch without data_only to train")
    compute_cleanup()
    sys.exit(0)

# the model and its optimizer
torch.manual_seed(seed)
model = load_model(init_from, mask_token_id, new_mask, device, attention, demo_overrides)
if tp > 1:
    tensor_parallelize(model, mesh["tp"])
model.config.next_block_size = block_size  # exported with the model: sample.py decodes with these
model.config.chat_template_kwargs = chat_template_kwargs
if finetune == "gated_lora":
    adapted = lora.add_adapters(model, lora_rank, lora_alpha, tuple(
        t.strip() for t in lora_targets.split(",")))
    print0(f"gated_lora: {adapted} adapted linears (rank {lora_rank}, alpha {lora_alpha}), base "
           "frozen: only mask positions learn; loss_ar stays the base model's")
if gradient_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if compile:
    for layer in decoder_layers(model):
        layer.compile()
n_params = sum(p.numel() for name, p in model.named_parameters() if not lora.is_adapter_key(name))
flops_token = flops_per_token(model, max_length)
model = parallelize(model, parallel, device, ptdtype, mesh)
autocast = torch.autocast(device.type, dtype=ptdtype) if ptdtype != torch.float32 else nullcontext()
decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
groups = [{"params": decay, "weight_decay": weight_decay},
          {"params": no_decay, "weight_decay": 0.0}]
optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95),
                              fused=device.type == "cuda")
n_trainable = sum(p.numel() for p in decay + no_decay)
print0(f"model: {init_from} | {n_params / 1e6:.2f}M params, {n_trainable / 1e6:.3f}M trainable "
       f"({100 * n_trainable / n_params:.1f}%), AdamW state {8 * n_trainable / 2 ** 20:.1f} MiB | "
       f"attention {attn_impl} | mask token id {mask_token_id}")

# resume: the newest intact checkpoint's model, optimizer, data position and random state
step, wandb_id = 0, None
if previous is not None:
    path, sidecar, restored = checkpoint.resume(out_dir, model, optimizer, device)
    if path is None:
        raise UserError(f"no checkpoint in {out_dir} can be loaded (see above): use another "
                        "out_dir, or --resume=disable to start over there")
    batches.load_state_dict(sidecar["data"])
    step, wandb_id, run_id = sidecar["step"], sidecar.get("wandb_id"), sidecar["run_id"]
    if not restored:
        print0(f"note: {path} was written by {sidecar['world_size']} ranks; random state "
               "restarts on the others")
    print0(f"resumed from {path} (step {step}, epoch {batches.epoch})")


def get_lr(step):
    """Linear warmup over warmup_ratio of the steps, then cosine decay to min_lr."""
    warmup = int(warmup_ratio * total_steps)
    if step < warmup:
        return learning_rate * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def val_batches():
    return data.eval_batches(val_samples, batch_size, max_length, block_size, mask_token_id, layout,
                             dp_rank, dp, pad_multiple, mask_token_id)


def save(step, metrics):
    if not all_finite(model, device):
        raise UserError(f"the weights at step {step} are not finite: not saved (newest checkpoint: "
                        f"{newest()}); lower learning_rate or check the data")
    sidecar = {"run_id": run_id, "world_size": world, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
               "data": batches.state_dict(), "data_key": data_key, "wandb_id": wandb_id,
               "metrics": metrics, "config": config, "bad_rows": bad_rows}
    final = checkpoint.save(out_dir, step, model, optimizer, tokenizer, sidecar, ptdtype, device)
    if master:
        checkpoint.prune(out_dir, keep_last)
    barrier()
    print0(f"saved {final}")


def newest():
    return (checkpoint.checkpoints(out_dir) or [(0, "none")])[-1][1]


def log_json(row, name="metrics.jsonl"):
    if master:
        try:
            with open(os.path.join(out_dir, name), "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {os.path.join(out_dir, name)}: {e.strerror} (newest "
                            f"checkpoint: {newest()}, intact)") from None


def log(row, line=None):
    """A step's numbers: a console line on rank 0 (above the progress bar), a metrics.jsonl row,
    and W&B."""
    if line is not None and not bar.disable:
        bar.write(line)
    elif line is not None:
        print0(line)
    log_json(row)
    if run:
        run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


run = None
if step < total_steps:  # a start, or a resume with work left: marked in the logs
    marker = {"event": "resume" if step else "start", "step": step, "run_id": run_id,
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    log_json(marker)
    if log_samples:
        log_json(marker, "samples.jsonl")
    if wandb_log and master:
        import wandb
        wandb_id = wandb_id or uuid.uuid4().hex[:8]  # kept in every checkpoint: a resume logs to it
        kwargs = dict(project=wandb_project, config=config, dir=out_dir, id=wandb_id,
                      name=wandb_run_name or os.path.basename(os.path.normpath(out_dir)),
                      resume="allow")
        try:
            run = wandb.init(**kwargs)
        except Exception as e:  # no network or no API key: keep training, log offline
            print0(f"wandb: {first_line(e)}; logging offline to {out_dir}/wandb")
            run = wandb.init(**kwargs, mode="offline")
else:
    print0(f"nothing to do: {out_dir} already holds step {step} of {total_steps} (raise max_steps "
           "or epochs to go on)")


def request_stop(signum, frame):
    """SIGTERM (preemption), SIGHUP (the terminal closed, the ssh session dropped) or a first
    Ctrl-C: save at the end of this step, then exit 0. A second Ctrl-C aborts at once (the newest
    complete checkpoint stays the one to resume)."""
    global stop_requested
    if stop_requested and signum == signal.SIGINT:
        raise KeyboardInterrupt
    if signum == signal.SIGHUP:  # a hung-up terminal fails every write (EIO): stop writing there
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in terminals:
            os.dup2(devnull, fd)
        os.close(devnull)
    stop_requested = signal.Signals(signum).name
    again = " (Ctrl-C again to abort)" if signum == signal.SIGINT else ""
    print0(f"{stop_requested}: saving a checkpoint at the end of this step, then exiting{again}")


stop_requested, nonfinite, metrics = None, 0, {}
terminals = [fd for fd in (1, 2) if os.isatty(fd)]  # now: once hung up, a terminal is no tty
signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGHUP, request_stop)
signal.signal(signal.SIGINT, request_stop)
model.train()
peak = peak_flops(device)
bar = tqdm(total=total_steps, initial=step, disable=not (master and sys.stderr.isatty()),
           dynamic_ncols=True)
t0 = time.time()
# -------------------------------------------------------------------------------------------------
# the loop
while step < total_steps:
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    micro = batches.next()
    if log_samples:
        log_json({"step": step + 1, "samples": batches.step_samples}, "samples.jsonl")
    # the loss is a sum over every supervised position of this step on every rank, divided by their
    # number: accumulation and world size never change the math (docs/design.md, The loss)
    labelled = sum((b["labels"] != -100).sum() for b in micro)
    supervised = all_sum(torch.tensor(float(labelled), device=device)) / tp
    sums = dict.fromkeys(("loss", "loss_ar", "n_ar", "loss_mask", "n_mask", "clean", "tokens"), 0)
    for k, batch in enumerate(micro):
        set_grad_sync(model, k == len(micro) - 1)
        batch = to_device(batch, device)
        with autocast:
            losses, _, is_mask = forward_losses(model, batch)
        weighted = (losses * torch.where(is_mask, mask_loss_weight, 1.0)).sum()
        # x dp: DDP and FSDP average gradients over ranks, and this loss is already global
        (weighted * (dp / supervised)).backward()
        real = batch["doc_ids"] >= 0
        for key, value in (("loss", weighted), ("loss_ar", losses[~is_mask].sum()),
                           ("n_ar", (~is_mask).sum()), ("loss_mask", losses[is_mask].sum()),
                           ("n_mask", is_mask.sum()), ("clean", (real & ~batch["is_mask"]).sum()),
                           ("tokens", real.sum())):
            sums[key] = sums[key] + value.detach().double()
    sum_partial_grads(model)
    sums = {k: torch.as_tensor(v, dtype=torch.float64, device=device) / tp for k, v in sums.items()}
    sums["stop"] = torch.tensor(float(stop_requested is not None), dtype=torch.float64,
                                device=device)  # every rank learns of a signal any rank got
    sums = dict(zip(sums, all_sum(torch.stack(list(sums.values()))).tolist()))
    loss_value = sums["loss"] / supervised.item()
    grad_norm = clip_grads(model, grad_clip)
    if math.isfinite(loss_value) and math.isfinite(grad_norm):
        optimizer.step()
        nonfinite = 0
    else:  # skipped: no weight ever takes a non-finite step
        nonfinite += 1
        if nonfinite >= max_nonfinite:
            raise UserError(f"{nonfinite} steps in a row had a non-finite loss or grad norm (step "
                            f"{step + 1}: loss {loss_value:.4g}, grad norm {grad_norm:.4g}) and "
                            f"were skipped: stopping (max_nonfinite={max_nonfinite}; newest "
                            f"checkpoint: {newest()}); lower learning_rate or check the data")
    optimizer.zero_grad(set_to_none=True)
    step += 1
    bar.update(1)

    dt, t0 = time.time() - t0, time.time()
    metrics = {"step": step, "loss": loss_value, "loss_ar": sums["loss_ar"] / max(sums["n_ar"], 1),
               "loss_mask": sums["loss_mask"] / max(sums["n_mask"], 1), "lr": lr,
               "grad_norm": grad_norm, "tokens_per_sec": sums["tokens"] / dt,
               "clean_tokens_per_sec": sums["clean"] / dt, "epoch": batches.epoch}
    if peak:
        metrics["mfu"] = flops_token * sums["tokens"] / dt / (peak * world)
    if nonfinite:
        metrics["skipped"] = nonfinite
    bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{sums['tokens'] / dt:.0f}")
    if step % log_every == 0 or step == total_steps or nonfinite:
        mfu = f" | mfu {100 * metrics['mfu']:.0f}%" if peak else ""
        skipped = " | non-finite: step skipped" if nonfinite else ""
        log(metrics, f"step {step}/{total_steps} | loss {loss_value:.4f} (ar "
                     f"{metrics['loss_ar']:.3f}, mask {metrics['loss_mask']:.3f}) | lr {lr:.1e} | "
                     f"grad_norm {grad_norm:.2f} | {sums['tokens'] / dt / 1e3:.1f}k tok/s{mfu}"
                     f"{skipped}")
    if val_samples and ((eval_every and step % eval_every == 0) or step == total_steps):
        val = evaluate(model, val_batches(), block_size, device, autocast, tp)
        metrics.update(val)
        accs = " ".join(f"{val[f'acc@{k}']:.2f}" for k in range(block_size))
        log({"step": step, **val}, f"eval step {step} | val_loss_ar {val['val_loss_ar']:.4f} | "
                                   f"val_loss_mask {val['val_loss_mask']:.4f} | acc@0.."
                                   f"{block_size - 1} {accs} | tpf_tf {val['tpf_tf']:.2f}")
        t0 = time.time()  # validation time is not training throughput
    if (save_every and step % save_every == 0) or step == total_steps or sums["stop"] > 0:
        save(step, metrics)
        t0 = time.time()
    if sums["stop"] > 0:
        print0(f"stopped on request: saved step {step}, exiting")
        break

bar.close()
if run:
    run.finish()
compute_cleanup()
