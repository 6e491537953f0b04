"""The Checkpoint folder: atomic, checksummed, resumable (docs/checkpoints.md has the whole story).

    checkpoint.save(out, step, rank=r, model_sd=full, ema_sd=full_ema, rank_state={...}, meta={...}, keep=2)
    last = checkpoint.latest(out)                     # step folder named by ``latest``, or None
    state = checkpoint.load_rank_state(last, layout)  # this rank's optimizer/RNG/step file, or CheckpointError

``save`` is collective: every rank writes ``optim/rankNNNNN.pt``, rank 0 the full ``model``/``ema.safetensors`` and
``meta.json`` with the sha256 of every file, into ``.tmp-step_XXXXXXXX/`` renamed when complete; ``latest`` is
rewritten atomically and all but the newest ``keep`` step folders are deleted. ``dist_state`` adds a megatron
``dist_checkpointing`` folder ``dist/`` (reshardable between layouts). ``verify`` re-hashes a folder and names a
corrupt file; ``resume_source_rank`` says which per-rank file a (possibly different) layout resumes from, or why it
cannot. ``Writer`` writes step folders in a background thread (``stage.async_checkpoint``): ``save`` copies the state
to CPU memory and returns; the files, the hashing and the rename follow in the thread, so a crash mid-write leaves a
``.tmp-`` folder, never one that looks complete.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from common.hashing import sha256_file

LATEST = "latest"
DIST = "dist"


class CheckpointError(RuntimeError):
    pass


def step_name(step: int) -> str:
    return f"step_{step:08d}"




Barrier = Callable[[bool], bool]   # every rank calls it with whether its part went well; True when all did


def _all_ok(ok: bool, group=None) -> bool:
    """A barrier that carries each rank's status: True when every rank of ``group`` passed ok=True (a rank whose
    write failed still reaches it, so the others fail at once instead of waiting for the collective timeout)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ok
    on = torch.device("cuda", torch.cuda.current_device()) \
        if torch.distributed.get_backend(group) == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=on)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _barrier(ok: bool = True) -> bool:
    return _all_ok(ok)


def _step(barrier: Barrier, what: str, work: Callable[[], None]) -> None:
    """Run this rank's ``work`` of a save, then agree with the other ranks at ``barrier``: this rank's error, or a
    CheckpointError naming ``what`` when another rank's part failed."""
    error: Optional[BaseException] = None
    try:
        work()
    except Exception as e:   # noqa: BLE001 - reported after the barrier, which every rank must reach
        error = e
    if not barrier(error is None):
        if error is not None:
            raise error
        raise CheckpointError(f"another rank failed while {what}; this rank stops too (that rank's log has the "
                              "cause: disk space, permissions)")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(output_dir: str | Path, step: int, *, rank: int, model_sd: Optional[Dict[str, torch.Tensor]],
         ema_sd: Optional[Dict[str, torch.Tensor]], rank_state: Dict[str, Any], meta: Dict[str, Any],
         keep: int, barrier: Barrier = _barrier, dist_state: Optional[Dict[str, Any]] = None,
         extra_sd: Optional[Dict[str, Dict[str, torch.Tensor]]] = None, writer: Optional["Writer"] = None) -> Path:
    """Write step folder ``step`` (collective). ``model_sd``/``ema_sd`` are the full state dicts, needed on rank 0
    unless ``dist_state`` is given and both are None (then the weights are only in ``dist/``).
    ``dist_state``: a megatron sharded state dict every rank passes, saved with ``dist_checkpointing`` in ``dist/``.
    ``extra_sd``: {file name: full state dict} that rank 0 also writes as safetensors (the LoRA adapters).
    ``writer``: write in its background thread (after waiting for its previous write): the tensors are copied to
    CPU memory here, ``dist/`` (collective over the training groups) is still written here, the rest there; the
    returned folder exists once ``writer.wait()`` returns."""
    out = Path(output_dir)
    final, tmp = out / step_name(step), out / f".tmp-{step_name(step)}"
    if rank == 0 and (model_sd is not None or ema_sd is not None or dist_state is None) and \
            (model_sd is None or ema_sd is None):
        raise ValueError("checkpoint.save: rank 0 needs the full model and EMA state dicts (both, or neither "
                         "with a dist_state)")
    if writer is not None:
        writer.wait()   # one write in flight: its folder is complete before the next one starts
    if dist_state is not None:
        from megatron.core import dist_checkpointing

        _open(out, tmp, rank, barrier, dist=True)
        dist_checkpointing.save(dist_state, str(tmp / DIST))
    files: Dict[str, Any] = {f"optim/rank{rank:05d}.pt": {**rank_state, "step": step}}
    if rank == 0:
        if model_sd is not None and ema_sd is not None:
            files.update({"model.safetensors": model_sd, "ema.safetensors": ema_sd})
        files.update(extra_sd or {})
    if writer is None:
        _write(out, step, rank, files, meta, keep, barrier, opened=dist_state is not None)
    else:
        writer.submit(functools.partial(_write, out, step, rank, cpu_copy(files), meta, keep, writer.barrier,
                                        opened=dist_state is not None))
    return final


def _open(out: Path, tmp: Path, rank: int, barrier: Barrier, dist: bool = False) -> None:
    """Rank 0 makes the empty ``.tmp-step_XXXXXXXX/`` (a stale one from a crash is removed); all ranks wait."""
    def make() -> None:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "optim").mkdir(parents=True)
            if dist:
                (tmp / DIST).mkdir()
    _step(barrier, f"making {tmp}", make)


def _write(out: Path, step: int, rank: int, files: Dict[str, Any], meta: Dict[str, Any], keep: int,
           barrier: Barrier, opened: bool) -> None:
    """Every rank writes its ``files`` ({name: object} for ``optim/*.pt``, {name: state dict} for safetensors)
    into the tmp folder; then rank 0 hashes them all into meta.json, renames the folder, points ``latest`` at it
    and prunes. A crash before the rename leaves only ``.tmp-step_XXXXXXXX/`` (never looks complete)."""
    from safetensors.torch import save_file

    final, tmp = out / step_name(step), out / f".tmp-{step_name(step)}"
    if not opened:
        _open(out, tmp, rank, barrier)

    def write_files() -> None:
        for name, obj in files.items():
            if name.endswith(".pt"):
                torch.save(obj, tmp / name)
            else:
                save_file({k: v.contiguous() for k, v in obj.items()}, str(tmp / name))

    def complete() -> None:
        if rank == 0:
            names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            (tmp / "meta.json").write_text(json.dumps(
                {**meta, "step": step, "checksums": {f: sha256_file(tmp / f) for f in names}}, indent=2,
                sort_keys=True))
            if final.exists():   # a re-run of the same step replaces it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _write_text_atomic(out / LATEST, final.name + "\n")
            _prune(out, keep)

    _step(barrier, f"writing its files into {tmp}", write_files)
    _step(barrier, f"completing {final.name} (rank 0: checksums, rename, {LATEST})", complete)


def cpu_copy(obj: Any) -> Any:
    """``obj`` with every tensor in its dicts / lists / tuples replaced by a CPU copy (a snapshot the training
    thread can go on mutating)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class Writer:
    """Writes step folders in a background thread, one at a time (``stage.async_checkpoint``).

        writer = Writer(background_barrier())   # collective: every rank, at the same point
        save(..., writer=writer)                # returns once the state is copied; the files follow
        writer.wait()                           # before the process ends (and before the next save: save does it)

    ``barrier``: the writer thread's barrier, on a process group of its own (``background_barrier``): the training
    thread's collectives go on meanwhile and must not be interleaved with it on one group. An error in the thread
    is raised by the next ``wait`` (or ``save``)."""

    def __init__(self, barrier: Barrier = lambda ok: ok):
        self.barrier = barrier
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()

        def run() -> None:
            try:
                write()
            except BaseException as e:   # noqa: BLE001 - handed to the training thread by wait()
                self._error = e

        # daemon: a rank that fails elsewhere exits without waiting; its unfinished folder stays .tmp-*
        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint failed: {e!r}; its .tmp-step_* folder is incomplete and "
                                  "is removed by the next save; fix the cause (disk space, permissions) and rerun to "
                                  "resume from the previous step folder") from e


def background_barrier() -> Barrier:
    """A status barrier (``_all_ok``) on a new gloo process group of all ranks, for ``Writer``'s thread
    (collective: every rank calls it at the same point of the program); passes ``ok`` through without a process
    group."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return lambda ok: ok
    group = torch.distributed.new_group(backend="gloo")
    return functools.partial(_all_ok, group=group)


def _prune(out: Path, keep: int) -> None:
    steps = sorted(p for p in out.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in out.glob(".tmp-step_*"):   # left behind by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


def latest(output_dir: str | Path) -> Optional[Path]:
    """The newest complete step folder named by ``latest``, or None when the stage has not saved yet."""
    out = Path(output_dir)
    pointer = out / LATEST
    if not pointer.is_file():
        return None
    folder = out / pointer.read_text().strip()
    if not (folder / "meta.json").is_file():
        raise CheckpointError(f"{pointer} names {folder.name}, which is missing or incomplete; delete {pointer} to "
                              "restart the stage from scratch, or point it at an existing step folder")
    return folder


def read_meta(step_dir: str | Path) -> Dict[str, Any]:
    path = Path(step_dir) / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: {step_dir} is not a complete checkpoint step folder")
    return json.loads(path.read_text())


def verify(step_dir: str | Path, only: Optional[list] = None, under: Optional[str] = None) -> Dict[str, Any]:
    """Re-hash the folder's files (or just ``only``, or just those under the folder ``under``) against meta.json;
    returns the meta."""
    step_dir = Path(step_dir)
    meta = read_meta(step_dir)
    if under is not None and not any(n.startswith(under + "/") for n in meta["checksums"]):
        raise CheckpointError(f"checkpoint {step_dir} has no {under}/ files (was it saved with checkpoint_format "
                              "'full'?)")
    for name in only or []:
        if name not in meta["checksums"]:
            raise CheckpointError(f"checkpoint {step_dir} has no {name} (not listed in meta.json)")
    for name, expected in meta["checksums"].items():
        if only is not None and name not in only:
            continue
        if under is not None and not name.startswith(under + "/"):
            continue
        path = step_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {step_dir}: {name} is missing (listed in meta.json)")
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"checkpoint {step_dir}: checksum mismatch for {name} (expected {expected[:12]}..., "
                                  f"got {actual[:12]}...); the file is corrupt: delete {step_dir} and resume from an "
                                  "older step")
    return meta


def has_full_weights(step_dir: str | Path, ema: bool = False) -> bool:
    """Whether the step folder holds the full ``model.safetensors`` (``ema.safetensors``): listed in its meta.json."""
    return ("ema.safetensors" if ema else "model.safetensors") in read_meta(step_dir).get("checksums", {})


def load_weights(step_dir: str | Path, ema: bool = False) -> Dict[str, torch.Tensor]:
    """The full (unsharded) model or EMA state dict of a step folder, after verifying its checksum."""
    from safetensors.torch import load_file

    name = "ema.safetensors" if ema else "model.safetensors"
    if not has_full_weights(step_dir, ema) and has_dist(step_dir):
        raise CheckpointError(f"checkpoint {step_dir} has no {name}: it was saved with full_weights 'final' before "
                              "the stage's last step, so its weights are only in dist/; write the file with "
                              f"`python -m trainer.export {step_dir} OUT.safetensors --layout ours"
                              f"{' --ema' if ema else ''}`, or load dist/ (checkpoint_format 'dist')")
    verify(step_dir, only=[name])
    return load_file(str(Path(step_dir) / name))


def load_file_verified(step_dir: str | Path, name: str) -> Dict[str, torch.Tensor]:
    """A safetensors file of a step folder (e.g. the LoRA adapters), after verifying its checksum."""
    from safetensors.torch import load_file

    verify(step_dir, only=[name])
    return load_file(str(Path(step_dir) / name))


LAYOUT_KEYS = ("tensor_parallel", "context_parallel", "data_parallel")


def saved_layout(meta: Dict[str, Any]) -> Tuple[int, int, int]:
    """(tensor_parallel, context_parallel, data_parallel) of a checkpoint (context_parallel 1 before it was
    recorded)."""
    return int(meta.get("tensor_parallel", 1)), int(meta.get("context_parallel", 1)), int(meta.get("data_parallel", 1))


def layout_str(layout: Tuple[int, int, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in zip(LAYOUT_KEYS, layout))


def resume_source_rank(step_dir: str | Path, meta: Dict[str, Any], *, tp: int, cp: int, dp: int, rank: int,
                       tp_rank: int, cp_rank: int, dp_rank: int, pp: int = 1, pp_rank: int = 0,
                       micro_batches: int = 1) -> int:
    """The global rank whose ``optim/rankNNNNN.pt`` this rank resumes from (see the module docstring), or
    ``CheckpointError`` naming the saved and the requested layout when this layout cannot resume the checkpoint.
    Global ranks follow megatron's order: rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank)).
    A changed pipeline_parallel (each rank's optimizer file holds its stage's blocks) or micro_batches (the global
    batch and the clips of each step) is always refused."""
    s_pp, s_micro = int(meta.get("pipeline_parallel", 1)), int(meta.get("micro_batches", 1))
    if (s_pp, s_micro) != (pp, micro_batches):
        raise CheckpointError(
            f"cannot resume {step_dir}: it was saved with pipeline_parallel={s_pp}, micro_batches={s_micro}, this "
            f"stage requests pipeline_parallel={pp}, micro_batches={micro_batches}: the per-rank optimizer files "
            "hold one pipeline stage's blocks each, and micro_batches sets the global batch (micro_batch_size x "
            "micro_batches x data_parallel) and which clips each step reads. Rerun with the saved values, or use a "
            "new output_dir and pass this step folder as init_checkpoint (weights only, any layout)")
    saved, requested = saved_layout(meta), (tp, cp, dp)
    if saved == requested:
        return rank
    s_tp, s_cp, s_dp = saved
    fmt, distopt = meta.get("checkpoint_format", "full"), bool(meta.get("distributed_optimizer", False))
    why = []
    if dp != s_dp:
        why.append("data_parallel sets the global batch (micro_batch_size x data_parallel) and which clips each step "
                   "reads, so a resume keeps it")
    if distopt:
        why.append("the distributed optimizer's state in dist/ ('dp_reshardable', sharded over the data x context "
                   "parallel ranks of each tensor-parallel rank) is only resumed at the layout that wrote it")
    elif tp != s_tp and not (fmt == "dist" and meta.get("optimizer_in_dist")):
        why.append("its AdamW state is in optim/rankNNNNN.pt, one file per global rank holding that rank's "
                   "tensor-parallel shard, which is not resharded (checkpoint_format 'dist' stores it reshardably)")
    if why:
        raise CheckpointError(
            f"cannot resume {step_dir}: it was saved with {layout_str(saved)} (checkpoint_format {fmt}"
            f"{', distributed_optimizer' if distopt else ''}), this stage requests {layout_str(requested)}: "
            f"{'; '.join(why)}. Rerun with the saved layout, or use a new output_dir and pass this step folder as "
            "init_checkpoint (weights only, any layout)")
    # CP rank 0 of the same TP (or any TP, resharded), DP rank and PP stage
    return tp_rank % s_tp + s_tp * (s_cp * (dp_rank + s_dp * pp_rank))


def load_rank_state(step_dir: str | Path, layout, micro_batches: int = 1) -> Dict[str, Any]:
    """This rank's optimizer/RNG/step state for resuming (``layout``: a ``trainer.device.Layout``): the file
    ``resume_source_rank`` picks, with ``"resharded": True`` added when the layout differs from the saved one."""
    meta = read_meta(step_dir)
    src = resume_source_rank(step_dir, meta, tp=layout.tp, cp=layout.cp, dp=layout.dp, rank=layout.rank,
                             tp_rank=layout.tp_rank, cp_rank=layout.cp_rank, dp_rank=layout.dp_rank,
                             pp=getattr(layout, "pp", 1), pp_rank=getattr(layout, "pp_rank", 0),
                             micro_batches=micro_batches)
    name = f"optim/rank{src:05d}.pt"
    verify(step_dir, only=[name])
    state = torch.load(Path(step_dir) / name, map_location="cpu", weights_only=True)
    state["resharded"] = saved_layout(meta) != (layout.tp, layout.cp, layout.dp)
    return state


def has_dist(step_dir: str | Path) -> bool:
    return (Path(step_dir) / DIST).is_dir()


def load_dist(step_dir: str | Path, sharded_state: Dict[str, Any]) -> Dict[str, Any]:
    """Verify the checksums of ``dist/`` and load it into ``sharded_state`` (collective; any TP size)."""
    from megatron.core import dist_checkpointing

    verify(step_dir, under=DIST)
    with torch.no_grad():
        return dist_checkpointing.load(sharded_state, str(Path(step_dir) / DIST))
