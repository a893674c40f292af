"""The process group of a ``torchrun`` launch, and the few collectives saeforge needs on top of torch.distributed.

``torchrun`` starts one process per rank with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set; :func:`start` joins the group (NCCL on GPUs, one GPU per local rank; gloo on CPUs). Every
failure a user can fix is raised on *every* rank with the same message (:func:`together`, :func:`on_main`), so one
rank's bad input never leaves the others waiting in a collective.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, NoReturn, TypeVar

import torch
import torch.distributed as dist

from saeforge.errors import SaeforgeError
from saeforge.models.loading import resolve_device

__all__ = ["Ranks", "all_gather_object", "broadcast_object", "exit_rank", "launched_by_torchrun", "on_main", "start",
           "stop", "together"]

T = TypeVar("T")

# A collective waits this long for a rank that stopped without an error saeforge could report (a crash, a kill);
# torchrun's agent usually ends the others first.
TIMEOUT = timedelta(minutes=10)


def launched_by_torchrun() -> bool:
    """Whether this process is one of several ranks (torchrun, or anything that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    started_group: bool = False  # whether :func:`start` created the process group (and :func:`stop` ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(device: str = "auto") -> Ranks:
    """Join the process group torchrun describes (or use the one the caller already set up)."""
    for var in ("RANK", "WORLD_SIZE"):
        if var not in os.environ:
            raise SaeforgeError(f"{var} is not set, so this process does not know its place among the ranks",
                                "launch with torchrun: `torchrun --nproc-per-node 2 -m saeforge train ...`")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = resolve_device(device)
    if wanted.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SaeforgeError(f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible)",
                                f"start at most {torch.cuda.device_count()} ranks per machine: "
                                f"`torchrun --nproc-per-node {torch.cuda.device_count()} ...`")
        wanted = torch.device("cuda", local_rank)
        torch.cuda.set_device(wanted)
    started = False
    if not dist.is_initialized():
        _import_world_defaults()
        dist.init_process_group("nccl" if wanted.type == "cuda" else "gloo", timeout=TIMEOUT,
                                device_id=wanted if wanted.type == "cuda" else None)
        started = True
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, wanted, started)


def _import_world_defaults() -> None:
    """Import, before the default group exists, the torch module that takes it as a default argument.

    ``torch.distributed.nn.functional`` declares ``def broadcast(tensor, src, group=group.WORLD)`` (and nine more
    like it): the default is evaluated once, when the module is first imported. torch imports it lazily (the first
    optimiser a process builds imports ``torch._dynamo``, which imports it), so imported during training those
    defaults hold the default group for the life of the process: ``destroy_process_group`` then cannot free it,
    gloo's threads (``gloo_tcp_loop``, ``pt_gloo_runloop``) outlive it, and their teardown at interpreter exit aborted
    a rank now and then (SIGABRT, 'terminate called without an active exception'). Imported before the group
    exists, the defaults are None, which torch reads as the default group of each call."""
    import torch.distributed.nn.functional  # noqa: F401


def leave_together() -> None:
    """A barrier at the end of a successful command: no rank tears its process group down while another still
    works with it (a rank that destroyed its gloo group and exited while its peer was finishing was seen to abort
    the peer with SIGABRT, 'terminate called without an active exception')."""
    if dist.is_initialized():
        dist.barrier()


def stop(ranks: Ranks) -> None:
    if ranks.started_group and dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a rank's process once its command has finished and written everything, without the interpreter's
    teardown.

    A defence kept by the ``saeforge`` entry point: the one known cause of a rank aborting in that teardown (gloo's
    threads outliving ``destroy_process_group`` and dying at exit with SIGABRT, 'terminate called without an active
    exception') is removed at its root (:func:`_import_world_defaults`), and a script that calls
    :func:`saeforge.training.train` ends through the plain teardown (tests/distributed/test_teardown.py). Exiting this
    way also ignores whatever else a process might still hold (a group captured by some other module). Every file
    saeforge writes is complete (atomic rename) before the command returns, so skipping the teardown loses nothing;
    the standard streams are flushed first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to keep
            pass
    os._exit(code)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; keep tensors in it on the CPU)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _raise_first(errors: list[tuple[str, str | None] | None], ranks_named: bool) -> None:
    for rank, err in enumerate(errors):
        if err is not None:
            problem, fix = err
            raise SaeforgeError(f"rank {rank}: {problem}" if ranks_named else problem, fix)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def together(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raises a :class:`SaeforgeError` on any, raise that error on all of them.

    Costs one one-element all-reduce when all went well (cheap enough for every training step)."""
    result, error = None, None
    try:
        result = fn()
    except SaeforgeError as err:
        error = (err.problem, err.fix)
    failed = torch.tensor([float(error is not None)], device=_collective_device())
    dist.all_reduce(failed)
    if failed.item() > 0:
        _raise_first(all_gather_object(error), ranks_named=True)
    return result  # type: ignore[return-value]


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and return its result on every rank (pickled); its :class:`SaeforgeError` is raised on
    every rank."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except SaeforgeError as err:
            error = (err.problem, err.fix)
    result, error = broadcast_object((result, error))
    _raise_first([error], ranks_named=False)
    return result
