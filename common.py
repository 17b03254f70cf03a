"""
What every entry script needs to run (nanochat's common.py): this process's rank and device, the
dtype, printing on rank 0, the few collectives the scripts share, progress for long work, and small
helpers (a file's crc32, rounding up to a multiple, a batch to the device).

    rank, local_rank, world, device = compute_init("auto")  # torchrun's variables, or rank 0 of 1
    print0("only rank 0 prints this")
    ...
    compute_cleanup()
"""

import os
import sys
import threading
import time
import zlib

import torch
import torch.distributed as dist
from tqdm import tqdm

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
    """'auto' -> bfloat16 on a CUDA GPU that supports it,
    float32 elsewhere; returns a torch dtype."""
    if dtype == "auto":
        dtype = ("bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported()
                 else "float32")
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


def device_mesh(device, tensor_parallel):
    """The run's 2-D mesh of ranks, ("dp", "tp"): tensor_parallel ranks (neighbours, inside a node)
    shard each layer, the groups of them shard by FSDP. None on one process."""
    if not dist.is_initialized():
        return None
    from torch.distributed.device_mesh import init_device_mesh
    world = dist.get_world_size()
    return init_device_mesh(device.type, (world // tensor_parallel, tensor_parallel),
                            mesh_dim_names=("dp", "tp"))


def compute_cleanup():
    """Leave the process group; under torchrun, end the process here with os._exit(0). gloo's worker
    threads can still hold work objects while the interpreter tears itself down, which aborts a
    finished job at random ("terminate called without an active exception", pytorch/pytorch#179291):
    so the caller closes its files, W&B and progress bars first, and the teardown is skipped."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _exit_with_launcher():
    """torchrun starts its workers in their own session: a `kill -9` of torchrun would leave them
    training (and saving into out_dir) with nobody to stop them. A daemon thread ends this worker
    once its launcher is gone, as a crash would: the newest complete checkpoint is what the next
    launch resumes."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        print(f"rank {dist_info()[0]}: the launcher (pid {parent}) is gone; stopping",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


def all_sum(t):
    """Sum a tensor over all ranks, in place (a no-op on one process)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_true(flag, device):
    """True on every rank iff flag is True on every rank:
    ranks agree before anyone acts on a failure."""
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    return all_sum(t).item() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_gather(obj):
    """Every rank's obj, in rank order ([obj] on one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -------------------------------------------------------------------------------------------------
# small helpers

def ceil_to(x, multiple):
    """x rounded up to a multiple of multiple."""
    return -(-x // multiple) * multiple


def file_crc32(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def to_device(batch, device):
    """The tensors of a collated batch, on device."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()
            if isinstance(v, torch.Tensor)}


class Progress:
    """Long work made visible: a tqdm bar on a terminal; off one (a log file, a cluster job), a
    plain line every `every` seconds, so that logs stay readable; nothing when not enabled."""

    def __init__(self, total, what, unit, every=30.0, enabled=True):
        self.total, self.what, self.unit, self.every = total, what, unit, every
        self.done, self.t0, self.last = 0, time.time(), time.time()
        self.bar = tqdm(total=total, desc=what, unit=f" {unit}", dynamic_ncols=True,
                        disable=not (enabled and sys.stderr.isatty()))
        self.lines = enabled and self.bar.disable

    def update(self, n, note=""):
        self.done += n
        self.bar.update(n)
        if note:
            self.bar.set_postfix_str(note, refresh=False)
        if self.lines and time.time() - self.last >= self.every:
            self.last, elapsed = time.time(), time.time() - self.t0
            eta = (f", ETA {elapsed * (self.total - self.done) / self.done:.0f} s"
                   if self.total and self.done else "")
            of = f"/{self.total}" if self.total else ""
            print(f"{self.what}: {self.done}{of} {self.unit}{', ' + note if note else ''} "
                  f"({elapsed:.0f} s{eta})", flush=True)

    def close(self):
        self.bar.close()


def text_table(rows):
    """Rows of dicts -> aligned text."""
    cols = list(rows[0])
    cells = [cols] + [[f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
                      for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)).rstrip() for row in cells)
