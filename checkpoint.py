"""
checkpoint.py: the checkpoint format of a run, and everything that writes, reads or finds it
(docs/design.md, "Checkpoints").

  out_dir/
    train.lock              held (flock) by the trainer running here; a second one is refused
    metrics.jsonl           one JSON row per log step; {"event": "resume", ...} rows mark resumes
    global_step_N/          a checkpoint: written as global_step_N.tmp, renamed once complete
      huggingface/          save_pretrained + tokenizer, for AutoModelForCausalLM / AutoTokenizer
      state/                model + optimizer tensors (torch.distributed.checkpoint); rank{r}.pt:
                            the RNG state of rank r, in plain tensors, numbers and strings
      checkpoint.json       step, run id, config, metrics, data position, the size and crc32 of
                            every file above, and a checksum of itself
    previous_runs/<run id>/ what --resume=disable moved aside (nothing is deleted but by keep_last)

A folder counts as a checkpoint once its checkpoint.json exists, so a crash while saving leaves only
debris (*.tmp, *.deleting), which the next start sweeps. A checkpoint whose files do not match its
manifest is renamed *.corrupt (one per step at most, kept for a look) and the newest intact one is
used instead. Nothing read from a checkpoint can run code: rank files load with weights_only=True,
the optimizer and model state are tensors only, and DCP's metadata goes through an unpickler that
builds nothing but DCP's own metadata classes.
"""

import copy
import errno
import fcntl
import io
import json
import os
import pickle
import random
import re
import shutil
import socket
import sys
import time
import warnings
import zlib

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict, set_state_dict)

import lora
from chat import load_tokenizer
from common import all_gather, all_true, barrier, dist_info, file_crc32, print0
from configurator import UserError, first_line
from model import from_pretrained, tensor_parallelize, unwrap

STEP_DIR = re.compile(r"^global_step_(\d+)$")
warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # 1 process: expected


class Corrupt(ValueError):
    """A checkpoint whose files are not what was saved (or not plain data): set aside, never
    loaded."""


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


def _checksum(sidecar):
    return zlib.crc32(json.dumps(sidecar, sort_keys=True, default=str).encode())


def read_sidecar(path):
    """A checkpoint's checkpoint.json as a dict, or None when it cannot be read, its own checksum
    does not match (it was edited) or it names another step than its folder."""
    try:
        with open(os.path.join(path, "checkpoint.json")) as f:
            sidecar = json.load(f)
        if "checksum" not in sidecar and "files" in sidecar:
            raise UserError(f"{path} was written by an older version of train.py (its "
                            "checkpoint.json has no checksum): resume it with that version, or "
                            "--resume=disable to start over")
        checksum = sidecar.pop("checksum")
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        if isinstance(e, UserError):
            raise
        return None
    m = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if checksum != _checksum(sidecar) or (m and sidecar.get("step") != int(m.group(1))):
        return None
    return sidecar


def find_hf_folder(path):
    """The Hugging Face folder that path means: itself, its huggingface/ subfolder, or that of the
    newest intact checkpoint when path is a run's out_dir (its export's files as saved: a newer
    one that is not is passed over with one line, as train.py resumes past it)."""
    complete = checkpoints(path)
    problems = []  # (checkpoint, what is wrong with its export), newest first
    for _, newest in reversed(complete):
        problem = _export_problem(newest)
        if problem is None:
            break
        problems.append((os.path.basename(newest), problem))
    if complete and len(problems) == len(complete):
        raise UserError(f"no intact checkpoint in {path}: the newest, {problems[0][0]}: "
                        f"{problems[0][1][:300]}")
    if problems:
        print0(f"note: decoding {newest}: the newer {', '.join(name for name, _ in problems)} "
               f"cannot be trusted ({problems[0][1][:300]})")
    path = newest if complete else path
    for folder in (path, os.path.join(path, "huggingface")):
        if os.path.exists(os.path.join(folder, "config.json")):
            return folder
    if not os.path.isdir(path):
        raise UserError(f"checkpoint {path!r} not found (run train.py first, or pass --ckpt=PATH)")
    raise UserError(f"{path!r} holds no checkpoint: not a Hugging Face model folder (no "
                    "config.json there or in huggingface/), nor a run's out_dir with a complete "
                    "global_step_N")


def _export_problem(ckpt):
    """None if a checkpoint's huggingface/ files are what it saved, else what is wrong."""
    sidecar = read_sidecar(ckpt)
    if sidecar is None:
        return "checkpoint.json cannot be read, or was edited (its checksum)"
    return verify(ckpt, {rel: v for rel, v in sidecar.get("files", {}).items()
                         if rel.startswith("huggingface" + os.sep)})


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
            print0(f"warning: cannot lock {path} ({e.strerror}); make sure no other trainer uses "
                   f"{out_dir}")
            return f
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
        f.close()
        raise UserError(f"out_dir {out_dir!r} is in use by another trainer ({holder}): wait for "
                        "it, stop it, or use another out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}\n")
    f.flush()
    return f


def sweep(out_dir):
    """Remove the debris of crashes: half-written (*.tmp), half-deleted (*.deleting) and incomplete
    global_step_N folders. Called with the lock held, so that nobody is writing them."""
    swept = []
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        incomplete = STEP_DIR.match(name) and not os.path.exists(os.path.join(path,
                                                                             "checkpoint.json"))
        if os.path.isdir(path) and (name.endswith((".tmp", ".deleting")) and
                                    name.startswith("global_step_") or incomplete):
            shutil.rmtree(path, ignore_errors=True)
            swept.append(name)
    return swept


def move_aside(out_dir, run_id):
    """resume='disable' on an out_dir that holds a run: move its checkpoints (and those set aside as
    corrupt), metrics and sample log to previous_runs/<run id>/ so that they can neither be resumed
    nor mixed with the new run, nor lost."""
    names = [n for n in os.listdir(out_dir) if STEP_DIR.match(n.removesuffix(".corrupt"))]
    if not names:
        return None
    complete = checkpoints(out_dir)
    theirs = ((read_sidecar(complete[-1][1]) or {}).get("run_id") if complete else None) or \
        time.strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(out_dir, "previous_runs", theirs)
    if os.path.exists(dest):
        dest += f"-{run_id}"
    os.makedirs(dest)
    for name in names + ["metrics.jsonl", "samples.jsonl"]:
        if os.path.exists(os.path.join(out_dir, name)):
            os.replace(os.path.join(out_dir, name), os.path.join(dest, name))
    return dest


def prune(out_dir, keep_last):
    """Keep the newest keep_last complete checkpoints (0: all), and the corrupt ones no older than
    them. Each is renamed before it is deleted, so that a crash mid-way leaves *.deleting debris for
    sweep(), never a half-deleted checkpoint."""
    complete = checkpoints(out_dir)
    if keep_last <= 0 or len(complete) <= keep_last:
        return
    oldest_kept = complete[-keep_last][0]
    old = [p for _, p in complete[:-keep_last]]
    for name in os.listdir(out_dir):
        m = STEP_DIR.match(name.removesuffix(".corrupt"))
        if name.endswith(".corrupt") and m and int(m.group(1)) < oldest_kept:
            old.append(os.path.join(out_dir, name))
    for path in old:
        os.replace(path, path + ".deleting")
        shutil.rmtree(path + ".deleting")


def set_aside(path):
    """Rename a checkpoint that cannot be trusted to path.corrupt (replacing an earlier one of the
    same step: one per step at most)."""
    shutil.rmtree(path + ".corrupt", ignore_errors=True)
    os.replace(path, path + ".corrupt")


def prepare(out_dir, config, compared, run_id, device):
    """Own out_dir for this run before anything slow happens: rank 0 checks that it is writable,
    takes the lock and sweeps the debris of crashes; with resume='auto' a run there whose settings
    `compared` differ from config is refused; with resume='disable' that run is moved to
    previous_runs/.
    Returns (the lock file or None, the newest readable checkpoint.json to resume or None)."""
    error, held, master = None, None, dist_info()[0] == 0
    if master:
        try:
            check_writable(out_dir)
            held = lock(out_dir)
            swept = sweep(out_dir)
            if swept:
                print0(f"swept the debris of an interrupted run: {', '.join(swept)}")
        except UserError as e:
            error = e
    if not all_true(error is None, device):
        raise error or UserError("rank 0 could not take out_dir (its message is above)")
    existing = checkpoints(out_dir)
    if existing and config["resume"] == "disable":
        if master:
            moved = move_aside(out_dir, run_id)
            print0(f"resume='disable': the {len(existing)} checkpoints of the previous run are in "
                   f"{moved}")
        barrier()
        return held, None
    theirs = next((s for _, p in reversed(existing) if (s := read_sidecar(p))), None)
    clash = [k for k in compared if theirs and theirs["config"].get(k, config[k]) != config[k]]
    if clash:
        was = ", ".join(f"{k}={theirs['config'].get(k)!r}" for k in clash)
        now = ", ".join(f"{k}={config[k]!r}" for k in clash)
        raise UserError(f"out_dir {out_dir!r} holds another run ({was}; this one has {now}): use "
                        "another out_dir, or --resume=disable to start over there (the old run is "
                        "moved aside)")
    return held, (theirs or {} if existing else None)


# -------------------------------------------------------------------------------------------------
# the files of a checkpoint: sizes and checksums

def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder)
                  for n in names if n != "checkpoint.json")


def _shared(mine):
    """The union of every rank's dict (each rank read a share of the files)."""
    return {k: v for part in all_gather(mine) for k, v in part.items()}


def manifest(folder):
    """{relative path: [size, crc32]} of every file in folder; the ranks share the reading."""
    rank, _, world = dist_info()
    return _shared({rel: [os.path.getsize(os.path.join(folder, rel)),
                          file_crc32(os.path.join(folder, rel))]
                    for rel in _files(folder)[rank::world]})


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
        elif file_crc32(path) != crc:
            problems[rel] = "contents changed (checksum)"
    problems = _shared(problems)
    return "; ".join(f"{k}: {v}" for k, v in sorted(problems.items())[:3]) or None


# -------------------------------------------------------------------------------------------------
# the RNG state of a rank, as plain data

def rng_state(device):
    """Every RNG a run draws from, in tensors, numbers and strings only (loadable with
    weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -------------------------------------------------------------------------------------------------
# saving

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
    return f"{type(e).__name__}: {first_line(e)}"


def _interrupted(error):
    """Whether error is a KeyboardInterrupt, or a DCP failure that wraps one."""
    if isinstance(error, CheckpointException):
        return any(isinstance(f[0] if isinstance(f, tuple) else f, KeyboardInterrupt)
                   for f in error.failures.values())
    return isinstance(error, KeyboardInterrupt)


def export_hf(model, tokenizer, path, master, dtype=None):
    """Write a Hugging Face folder (weights gathered from every rank; all ranks must call this)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if not master:
        return
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state, adapter = lora.split_state(state)  # the base weights unchanged, the adapter apart
    state.pop(tied_output_key(unwrap(model), state), None)
    unwrap(model).save_pretrained(path, state_dict=state)
    if adapter:
        lora.save_adapter(adapter, path)
    if dtype is not None:  # save_pretrained wrote the fp32 master's dtype: say what they are
        config = copy.deepcopy(unwrap(model).config)
        config.dtype = dtype
        config.save_pretrained(path)
    tokenizer.save_pretrained(path)


def tied_output_key(model, state):
    """The output embedding's key when it is tied to the input embedding (its copy in a gathered
    state dict is left out, as save_pretrained leaves it out of a single process's export), else
    None."""
    out = model.get_output_embeddings()
    if out is None or not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return None
    key = next((f"{name}.weight" for name, m in model.named_modules() if m is out), None)
    inputs = next((f"{name}.weight" for name, m in model.named_modules()
                   if m is model.get_input_embeddings()), None)
    if key in state and inputs in state and torch.equal(state[key], state[inputs]):
        return key
    return None


def _state(model, optimizer):
    """(the tensors DCP saves and loads in place, the optimizer's param_groups): only tensors go to
    DCP, so that loading never unpickles anything of a checkpoint's."""
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state["state"]}, optim_state["param_groups"]


def save(out_dir, step, model, optimizer, tokenizer, sidecar, export_dtype, device):
    """Write global_step_{step} atomically (every rank calls this). A failure on any rank (a full
    disk, a read-only file system) removes the half-written folder and raises one UserError naming
    path and reason on every rank; the checkpoints already there are untouched."""
    rank = dist_info()[0]
    master = rank == 0
    final = os.path.join(out_dir, f"global_step_{step}")
    tmp = final + ".tmp"

    def phase(fn):
        error = None
        try:
            fn()
        except (Exception, CheckpointException, KeyboardInterrupt) as e:
            error = e
        if _interrupted(error):  # a second Ctrl-C while saving: abort, leaving no half-written one
            if master:
                shutil.rmtree(tmp, ignore_errors=True)
            raise KeyboardInterrupt
        if not all_true(error is None, device):
            if master:
                shutil.rmtree(tmp, ignore_errors=True)
            reason = (io_reason(error, out_dir) if error is not None
                      else "another rank failed to write")
            raise UserError(f"cannot save {final}: {reason} (the checkpoints already in {out_dir} "
                            "are intact; free the space or fix the path, then run the same command "
                            "to resume)")

    def start():
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "state"))

    def write_state():
        dcp.save(_state(model, optimizer)[0], checkpoint_id=os.path.join(tmp, "state"))
        # one file per rank: DCP keeps a single copy of a non-tensor object saved by every rank
        torch.save({"rng": rng_state(device)}, os.path.join(tmp, "state", f"rank{rank}.pt"))

    def finish():
        barrier()
        files = manifest(tmp)
        if master:
            content = dict(sidecar, step=step, files=files)
            with open(os.path.join(tmp, "checkpoint.json"), "w") as f:
                json.dump(dict(content, checksum=_checksum(content)), f, indent=1, default=str)
                f.flush()
                os.fsync(f.fileno())
            shutil.rmtree(final, ignore_errors=True)  # a step of a run set aside as corrupt
            os.replace(tmp, final)

    phase(start)
    phase(lambda: export_hf(model, tokenizer, os.path.join(tmp, "huggingface"), master,
                            export_dtype))
    phase(write_state)
    phase(finish)
    return final


# -------------------------------------------------------------------------------------------------
# loading

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"}, "torch._utils": {"_get_layout"},
    "torch": {"Size"}, "pathlib": {"PosixPath", "Path"}, "collections": {"OrderedDict"}}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata and nothing else: any other class or function in the file is refused,
    so that a crafted .metadata cannot run code."""

    def find_class(self, module, name):
        if name in _METADATA_CLASSES.get(module, ()) or \
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return super().find_class(module, name)
        raise Corrupt(f"state/.metadata refers to {module}.{name}: refused (only DCP's metadata "
                      "classes may be loaded)")


def read_metadata(folder, name=".metadata"):
    """DCP's metadata of a state folder, read by _MetadataUnpickler; Corrupt when it holds anything
    else, or entries that are not tensors."""
    with open(os.path.join(folder, name), "rb") as f:
        metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
    kinds = {type(m).__name__ for m in getattr(metadata, "state_dict_metadata", {}).values()}
    if type(metadata).__name__ != "Metadata" or kinds - {"TensorStorageMetadata"}:
        raise Corrupt("state/.metadata holds entries that are not tensors: refused")
    return metadata


class _SafeReader(dcp.FileSystemReader):
    """DCP's file reader, its metadata read by read_metadata."""

    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        metadata = read_metadata(str(self.path), ".metadata" if rank is None
                                 else f"__{rank}.metadata")
        if getattr(metadata, "storage_meta", None) is None and hasattr(metadata, "storage_meta"):
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata.storage_meta = StorageMeta()
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class _TensorsOnlyPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value):
        raise Corrupt(f"state/ holds a pickled object for {read_item.dest_index.fqn}: refused")


def load(path, model, optimizer, device):
    """Load a checkpoint's model, optimizer and this rank's RNG state (every rank calls this).
    Returns checkpoint.json as a dict, and whether this rank's RNG state was there (a checkpoint
    written by fewer ranks has none for the others). Raises Corrupt when the files are not what
    was saved or hold anything but plain data."""
    sidecar = read_sidecar(path)
    if sidecar is None:
        raise Corrupt("checkpoint.json cannot be read, or was edited (its checksum)")
    problem = verify(path, sidecar.get("files", {}))
    if problem:
        raise Corrupt(problem)
    read_metadata(os.path.join(path, "state"))  # refused here, before DCP reads anything
    state, groups = _state(model, optimizer)
    dcp.load(state, storage_reader=_SafeReader(os.path.join(path, "state")),
             planner=_TensorsOnlyPlanner())
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"], "param_groups": groups})
    mine = os.path.join(path, "state", f"rank{dist_info()[0]}.pt")
    if not os.path.exists(mine):
        return sidecar, False
    try:
        rank_state = torch.load(mine, weights_only=True)
    except pickle.UnpicklingError:
        raise Corrupt(f"{os.path.basename(mine)} holds an object that is not plain data: refused "
                      "(loading it could run code)") from None
    set_rng_state(rank_state["rng"], device)
    return sidecar, True


def _cause(error):
    """The Corrupt in a DCP failure (which wraps each rank's error), or None."""
    todo = [error]
    while todo:
        x = todo.pop()
        if isinstance(x, Corrupt):
            return x
        if isinstance(x, CheckpointException):
            todo += [f[0] if isinstance(f, tuple) else f for f in x.failures.values()]
        elif x is not None:
            todo += [x.__cause__, x.__context__]
    return None


def resume(out_dir, model, optimizer, device):
    """Load the newest checkpoint whose files are what was saved (every rank calls this). A newer
    one that is not is set aside as *.corrupt with one line saying why; any other failure to load
    stops the run with one line and renames nothing (it may be passing: a file system, memory).
    Returns (path, checkpoint.json, whether this rank's RNG state was restored) or three Nones."""
    for _, path in reversed(checkpoints(out_dir)):
        error = None
        try:
            sidecar, restored = load(path, model, optimizer, device)
        except UserError:
            raise
        except (Exception, CheckpointException) as e:
            error = e
        problems = [p for p in all_gather(None if error is None else
                                          (bool(_cause(error)), first_line(_cause(error) or error)))
                    if p is not None]
        if not problems:
            return path, sidecar, restored
        corrupt, reason = problems[0]
        if not all(c for c, _ in problems):
            raise UserError(f"cannot load {path}: {reason[:300]} (nothing was renamed: fix the "
                            "cause and run the same command again, or --resume=disable)")
        print0(f"warning: {path} cannot be trusted ({reason[:300]}); set aside as {path}.corrupt, "
               "trying the next older checkpoint")
        barrier()
        if dist_info()[0] == 0:
            set_aside(path)
        barrier()
    return None, None, None


# -------------------------------------------------------------------------------------------------
# reading a checkpoint for decoding

def load_for_decoding(path, device, tp_mesh=None):
    """(model in fp32 on device, in eval mode, tokenizer, its folder) for sample.py and bench.py,
    with its gated adapter when it has one, sharded over tp_mesh when given (tensor parallel). fp32
    whatever the export's dtype: lossless == ar exactly needs it."""
    folder = find_hf_folder(path)
    tokenizer = load_tokenizer(folder)
    model = from_pretrained(folder).to(device)
    if tp_mesh is not None:
        tensor_parallelize(model, tp_mesh)
    lora.load_adapter(model, folder)  # a gated-LoRA run's adapter, on for mask positions only
    return model.eval(), tokenizer, folder
