"""
checkpoint.py: the checkpoint format of a run, and everything that writes, reads or finds it
(docs/design.md, "Checkpoints").

  out_dir/
    train.lock              held (flock) by the trainer running here; a second one is refused
    metrics.jsonl           one JSON row per log step; {"event": "resume", ...} rows mark resumes
    global_step_N/          a checkpoint: written as global_step_N.tmp, renamed once complete
      huggingface/          save_pretrained + tokenizer, for AutoModelForCausalLM / AutoTokenizer
      state/                model + optimizer (torch.distributed.checkpoint); rank{r}.pt: its RNG
      checkpoint.json       step, run id, config, metrics, data position, and the size and crc32 of
                            every file above: a checkpoint whose files do not match is never loaded
    previous_runs/<run id>/ what --resume=disable moved aside (nothing is ever deleted but by
                            keep_last)

A folder counts as a checkpoint once its checkpoint.json exists, so a crash while saving leaves only
debris (*.tmp, *.deleting), which the next start sweeps. A checkpoint that fails its check or its
load is renamed *.corrupt (kept for a look) and the newest intact one is used instead.
"""

import copy
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
import warnings
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

import lora
from common import all_true, barrier, dist_info, print0
from configurator import UserError
from model import load_tokenizer, unwrap

STEP_DIR = re.compile(r"^global_step_(\d+)$")
warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # 1 process: expected


# -------------------------------------------------------------------------------------------------
# finding checkpoints

def checkpoints(out_dir):
    """Complete checkpoints in out_dir, oldest first, as (step, path)."""
    found = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = STEP_DIR.match(name)
        if m and os.path.exists(os.path.join(out_dir, name, "checkpoint.json")):
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return sorted(found)


def read_sidecar(path):
    """A checkpoint's checkpoint.json as a dict, or None when it cannot be read."""
    try:
        with open(os.path.join(path, "checkpoint.json")) as f:
            sidecar = json.load(f)
        return sidecar if isinstance(sidecar, dict) else None
    except (OSError, ValueError):
        return None


def find_hf_folder(path):
    """The Hugging Face folder that path means: itself, its huggingface/ subfolder, or that of the
    newest complete checkpoint when path is a run's out_dir."""
    complete = checkpoints(path)
    if complete:
        path = complete[-1][1]
    for folder in (path, os.path.join(path, "huggingface")):
        if os.path.exists(os.path.join(folder, "config.json")):
            return folder
    if not os.path.isdir(path):
        raise UserError(f"checkpoint {path!r} not found (run train.py first, or pass --ckpt=PATH)")
    raise UserError(
        f"{path!r} holds no checkpoint: not a Hugging Face model folder (no config.json there or "
        "in huggingface/), nor a run's out_dir with a complete global_step_N"
    )


# -------------------------------------------------------------------------------------------------
# owning an out_dir: the lock, the debris of crashes, a previous run

def check_writable(out_dir):
    """Create out_dir if needed and prove it takes files, before anything slow happens."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir!r} is a file, not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"out_dir {out_dir!r} is not writable: {e.strerror}") from None


def lock(out_dir):
    """Hold out_dir/train.lock for the life of this process (flock: the kernel drops it when the
    process dies, however it dies, so a stale lock never blocks). Returns the open file, which must
    stay open."""
    path = os.path.join(out_dir, "train.lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):  # a file system without locks: say so
            print0(
                f"warning: cannot lock {path} ({e.strerror}); make sure no other trainer uses "
                f"{out_dir}"
            )
            return f
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
        f.close()
        raise UserError(
            f"out_dir {out_dir!r} is in use by another trainer ({holder}): wait for it, stop it, "
            "or use another out_dir"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(
        f"pid {os.getpid()} on {socket.gethostname()}, started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}: "
        f"{' '.join(sys.argv)}\n"
    )
    f.flush()
    return f


def sweep(out_dir):
    """Remove the debris of crashes: half-written (*.tmp), half-deleted (*.deleting) and incomplete
    global_step_N folders. Called with the lock held, so nobody is writing them."""
    swept = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        debris = name.startswith("global_step_") and (name.endswith((".tmp", ".deleting")) or (
            STEP_DIR.match(name) and not os.path.exists(os.path.join(path, "checkpoint.json"))))
        if debris and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            swept.append(name)
    return swept


def move_aside(out_dir, run_id):
    """resume='disable' on an out_dir that holds a run: move its checkpoints and metrics to
    previous_runs/<run id>/ so that they can neither be resumed nor mixed with the new run, nor
    lost.
    """
    complete = checkpoints(out_dir)
    if not complete:
        return None
    theirs = (read_sidecar(complete[-1][1]) or {}).get("run_id") or time.strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(out_dir, "previous_runs", theirs)
    if os.path.exists(dest):
        dest += f"-{run_id}"
    os.makedirs(dest)
    for name in [os.path.basename(p) for _, p in complete] + ["metrics.jsonl"]:
        if os.path.exists(os.path.join(out_dir, name)):
            os.replace(os.path.join(out_dir, name), os.path.join(dest, name))
    return dest


def prune(out_dir, keep_last):
    """Keep the newest keep_last complete checkpoints (0: all). Each old one is renamed before it is
    deleted, so a crash mid-way leaves *.deleting debris for sweep(), never a half-deleted
    checkpoint.
    """
    for _, path in checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        os.replace(path, path + ".deleting")
        shutil.rmtree(path + ".deleting")


# -------------------------------------------------------------------------------------------------
# the files of a checkpoint: sizes and checksums

def _crc32(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(folder):
    return sorted(
        os.path.relpath(os.path.join(d, n), folder)
        for d, _, names in os.walk(folder)
        for n in names
        if n != "checkpoint.json"
    )


def _shared(mine):
    """The union of every rank's dict (each rank hashed a share of the files)."""
    if not dist.is_initialized():
        return mine
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def manifest(folder):
    """{relative path: [size, crc32]} of every file in folder; the ranks share the reading."""
    rank, _, world = dist_info()
    mine = {}
    for rel in _files(folder)[rank::world]:
        path = os.path.join(folder, rel)
        mine[rel] = [os.path.getsize(path), _crc32(path)]
    return _shared(mine)


def verify(folder, files):
    """None if every file of the manifest is there with its size and crc32, else what is wrong."""
    rank, _, world = dist_info()
    problems = {}
    for rel in sorted(files)[rank::world]:
        path, (size, crc) = os.path.join(folder, rel), files[rel]
        if not os.path.exists(path):
            problems[rel] = "missing"
        elif os.path.getsize(path) != size:
            problems[rel] = f"{os.path.getsize(path)} bytes instead of {size}"
        elif _crc32(path) != crc:
            problems[rel] = "contents changed (checksum)"
    problems = _shared(problems)
    return "; ".join(f"{k}: {v}" for k, v in sorted(problems.items())[:3]) or None


# -------------------------------------------------------------------------------------------------
# saving and loading

def io_reason(e, path):
    """The OS's reason for a failed write, found in the exception chain (DCP wraps each rank's
    error)."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.strerror:
            return x.strerror
        if isinstance(x, CheckpointException):
            todo += [f[0] if isinstance(f, tuple) else f for f in x.failures.values()]
        todo += [x.__cause__, x.__context__]
    try:  # torch.save reports a full disk as "unexpected pos ...": ask the file system
        if shutil.disk_usage(path).free < 1 << 20:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _interrupted(error):
    """Whether error is a KeyboardInterrupt, or a DCP failure that wraps one."""
    if isinstance(error, KeyboardInterrupt):
        return True
    if isinstance(error, CheckpointException):
        return any(
            isinstance(f[0] if isinstance(f, tuple) else f, KeyboardInterrupt)
            for f in error.failures.values()
        )
    return False


def export_hf(model, tokenizer, path, master, dtype=None):
    """Write a Hugging Face folder (weights gathered from every rank; all ranks must call this)."""
    state = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if master:
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        # the base model's weights unchanged, the adapter apart
        state, adapter = lora.split_state(state)
        unwrap(model).save_pretrained(path, state_dict=state)
        if adapter:
            lora.save_adapter(adapter, path)
        if dtype is not None:  # save_pretrained wrote the fp32 master's dtype: say what they are
            config = copy.deepcopy(unwrap(model).config)
            config.dtype = dtype
            config.save_pretrained(path)
        tokenizer.save_pretrained(path)


def save(out_dir, step, model, optimizer, tokenizer, rank_state, sidecar, export_dtype, device):
    """Write global_step_{step} atomically (every rank calls this). A failure on any rank (a full
    disk, a read-only file system) removes the half-written folder and raises one UserError naming
    path and reason on every rank; the checkpoints already there are untouched."""
    rank, _, _ = dist_info()
    master = rank == 0
    final = os.path.join(out_dir, f"global_step_{step}")
    tmp = final + ".tmp"

    def phase(fn):
        error = None
        try:
            fn()
        except (Exception, CheckpointException, KeyboardInterrupt) as e:
            error = e
        # a second Ctrl-C while saving: abort, leaving no half-written folder
        if _interrupted(error):
            if master:
                shutil.rmtree(tmp, ignore_errors=True)
            raise KeyboardInterrupt
        if not all_true(error is None, device):
            if master:
                shutil.rmtree(tmp, ignore_errors=True)
            reason = (
                io_reason(error, out_dir) if error is not None else "another rank failed to write"
            )
            raise UserError(
                f"cannot save {final}: {reason} (the checkpoints already in {out_dir} are intact; "
                "free the space or fix the path, then run the same command to resume)"
            )

    def start():
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "state"))

    def write_state():
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save(
            {"model": model_state, "optim": optim_state}, checkpoint_id=os.path.join(tmp, "state")
        )
        # one file per rank: DCP keeps a single copy of a non-tensor object saved under one key by
        # all ranks
        torch.save(rank_state, os.path.join(tmp, "state", f"rank{rank}.pt"))

    def finish():
        barrier()
        files = manifest(tmp)
        if master:
            with open(os.path.join(tmp, "checkpoint.json"), "w") as f:
                json.dump(dict(sidecar, step=step, files=files), f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            # a step of a run that was set aside as corrupt
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)

    phase(start)
    phase(
        lambda: export_hf(model, tokenizer, os.path.join(tmp, "huggingface"), master, export_dtype)
    )
    phase(write_state)
    phase(finish)
    return final


def load(path, model, optimizer):
    """Load a checkpoint's model, optimizer and this rank's state (every rank calls this). Returns
    (checkpoint.json as a dict, this rank's state or None when the checkpoint was written by fewer
    ranks). Raises ValueError when the files do not match their manifest."""
    sidecar = read_sidecar(path)
    if sidecar is None:
        raise ValueError("checkpoint.json cannot be read")
    problem = verify(path, sidecar.get("files", {}))
    if problem:
        raise ValueError(problem)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=os.path.join(path, "state"))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    mine = os.path.join(path, "state", f"rank{dist_info()[0]}.pt")
    return sidecar, torch.load(mine, weights_only=False) if os.path.exists(mine) else None


def resume(out_dir, load_fn, device):
    """Load the newest checkpoint that loads (load_fn(path) on every rank); set aside as *.corrupt
    each newer one that does not, with one line saying why. Returns (path, what load_fn returned) or
    (None, None).
    """
    for _, path in reversed(checkpoints(out_dir)):
        error = None
        try:
            result = load_fn(path)
        except UserError:  # a setting that does not fit this checkpoint: the user's to fix
            raise
        except (Exception, CheckpointException) as e:
            error = e
        if all_true(error is None, device):
            return path, result
        reason = (
            str(error).strip().splitlines()[0] if error is not None else "failed on another rank"
        )
        print0(f"warning: {path} cannot be loaded ({reason[:300]}); set aside as {path}.corrupt, "
               "trying the next older checkpoint")
        barrier()
        if dist_info()[0] == 0:
            os.replace(path, path + ".corrupt")
        barrier()
    return None, None


# -------------------------------------------------------------------------------------------------
# reading a checkpoint for decoding

def load_for_decoding(path, device):
    """(model in fp32 on device, in eval mode, tokenizer, its folder) for sample.py and bench.py,
    with its gated adapter when it has one. fp32 whatever the export's dtype: lossless == ar exactly
    needs it."""
    from transformers import AutoModelForCausalLM
    folder = find_hf_folder(path)
    tokenizer = load_tokenizer(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, attn_implementation="sdpa", dtype=torch.float32
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"{folder}: cannot load the model ({str(e).strip().splitlines()[0]})"
        ) from None
    lora.load_adapter(model, folder)  # a gated-LoRA run's adapter, on for mask positions only
    return model.to(device).eval(), tokenizer, folder
