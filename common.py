"""
What every entry script needs to run (nanochat's common.py): this process's rank and device, the
dtype, printing on rank 0, and the few collectives the scripts share.

    rank, local_rank, world, device = compute_init("auto")  # torchrun's variables, or rank 0 of 1
    print0("only rank 0 prints this")
    ...
    compute_cleanup()
"""

import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from configurator import UserError


def dist_info():
    """(rank, local_rank, world) from torchrun's variables; a plain `python x.py` is rank 0 of 1."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def print0(*args, **kwargs):
    if dist_info()[0] == 0:
        print(*args, **kwargs, flush=True)


def resolve_device(device):
    """'auto' -> cuda if available, else cpu; 'cuda' without CUDA is one clear error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but no CUDA device is visible (use device='cpu')")
    return torch.device(device)


def resolve_dtype(dtype, device):
    """'auto' -> bfloat16 on a CUDA GPU that supports it, float32 elsewhere; returns a torch
    dtype."""
    if dtype == "auto":
        dtype = (
            "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        )
    return getattr(torch, dtype)


def compute_init(device="auto"):
    """(rank, local_rank, world, device): joins the process group under torchrun (NCCL on CUDA, gloo
    on CPU); each rank takes the GPU of its local rank."""
    rank, local_rank, world = dist_info()
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1:
        _exit_with_launcher()
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, local_rank, world, dev


def compute_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def _exit_with_launcher():
    """torchrun starts its workers in their own session: a `kill -9` of torchrun would leave them
    training (and saving into out_dir) with nobody to stop them. A daemon thread ends this worker
    once its launcher is gone, as a crash would: the newest complete checkpoint is what the next
    launch resumes."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        print(
            f"rank {dist_info()[0]}: the launcher (pid {parent}) is gone; stopping",
            file=sys.stderr,
            flush=True,
        )
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


def all_sum(t):
    """Sum a tensor over all ranks, in place (a no-op on one process)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_true(flag, device):
    """True on every rank iff flag is True on every rank: ranks agree before anyone acts on a
    failure."""
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    return all_sum(t).item() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()
