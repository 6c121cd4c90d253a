"""Collectives that work however the processes were launched.

``accelerate launch --multi_gpu`` on a machine without GPUs starts several processes and a process group,
but accelerate then reports ``DistributedType.NO``: its ``reduce``/``gather`` and DDP wrapping silently do
nothing, so each process would train alone. :class:`Collectives` detects that case and does the
synchronisation with ``torch.distributed`` directly (gloo), so the run stays correct.

A launch that cannot give what it asked for stops with :class:`LaunchError` before anything runs: several
processes without a process group; accelerate's CPU launcher (``distributed_type: MULTI_CPU`` / ``--cpu`` with
``num_processes`` > 1), which starts several processes only through ``mpirun`` and otherwise ONE; more
processes on a machine than it has GPUs; FSDP version 1.

FSDP2 (``distributed_type: FSDP`` with ``fsdp_version: 2``) is accelerate's: it shards the frozen backbone per
block (``fully_shard``). Three things are the toolkit's own, because the prefix is unlike the backbone:

* :func:`shard_apart` makes the float32 prefix encoder its own FSDP unit, kept in float32 (FSDP2 casts a unit's
  parameters to one dtype) and gathered from its forward until the backward has used it (its output is the
  gathered weight itself, which every layer's backward reads);
* :func:`full_state` / :func:`sharded_state` turn the sharded optimizer state into the one-process layout on the
  CPU (the checkpoint) and back;
* :func:`gathered_for_generation` holds the whole model gathered while each process decodes its own rows (a
  sharded forward is a collective, and the processes' rows end after different numbers of steps).

accelerate runs FSDP on GPUs only: on a machine without them it reports no distributed setup. There
:func:`start` switches its state to FSDP2 itself (gloo), so that ``accelerator.prepare`` shards the model through
the same code as on GPUs.
"""

from __future__ import annotations

import io
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from typing import NoReturn, TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedType,
    FullyShardedDataParallelPlugin,
    InitProcessGroupKwargs,
    gather_object,
    send_to_device,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

T = TypeVar("T")


class LaunchError(RuntimeError):
    """Processes were started in a way that cannot synchronise."""


class Collectives:
    """Sum-reduce, gather and barrier across the processes of a run."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0")) if self.world > 1 else 0
        # accelerate thinks it is alone although several processes run: sync by hand
        self.manual = self.world > 1 and accelerator.distributed_type == DistributedType.NO
        if self.manual and not dist.is_initialized():
            raise LaunchError(
                f"launched as {self.world} processes but no process group exists: the processes would train "
                "without synchronising (use `accelerate launch --multi_gpu --num_processes N` or a config from "
                "launch/accelerate/)"
            )
        if not self.manual and self.world != accelerator.num_processes:
            raise LaunchError(
                f"launched as {self.world} processes but accelerate runs {accelerator.num_processes}: the "
                "processes would train without synchronising"
            )

    @property
    def num_processes(self) -> int:
        return self.world if self.manual else self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.rank if self.manual else self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.manual:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            return tensor
        return self.accelerator.reduce(tensor, "sum")

    def gather_objects(self, items: list) -> list:
        """Concatenation of every process's ``items``, in process order."""
        if self.manual:
            out: list = [None] * self.world
            dist.all_gather_object(out, items)
            return [x for part in out for x in part]
        if self.accelerator.num_processes == 1:
            return list(items)
        return gather_object(items)

    def gather_to_cpu(self, item) -> list:
        """Every process's ``item`` (nested dicts / lists of tensors and plain values), in process order, with
        every tensor moved to the CPU first: unpickled on another process, a CUDA tensor would be rebuilt on
        that process's GPU (memory on every GPU, or "invalid device ordinal" where each sees one)."""
        return self.gather_objects([send_to_device(item, "cpu")])

    def average_gradients(self, params) -> None:
        """Mean of each gradient over processes (what DDP does); only needed when syncing by hand (not when
        FSDP2 reduces them)."""
        if not self.manual or self.accelerator.distributed_type != DistributedType.NO:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= self.world

    def barrier(self) -> None:
        if self.manual:
            dist.barrier()
        else:
            self.accelerator.wait_for_everyone()

    def raise_together(self, failure: BaseException | None) -> None:
        """A barrier at which every process learns whether any of them failed: when one did, every process
        raises the same error (the failure of the lowest rank that failed), marked :func:`on_every_process`,
        so that all of them stop with one message and one exit status. ``failure`` is this process's error (it
        must pickle: the one-line errors of the toolkit do), or None."""
        if self.num_processes == 1:
            if failure is not None:
                raise on_every_process(failure)
            return
        failures = [f for f in self.gather_objects([failure]) if f is not None]
        if failures:
            raise on_every_process(failures[0]) from None

    def together(self, fn: Callable[[], T], errors: tuple[type[BaseException], ...]) -> T:
        """``fn()`` on every process; when it raises one of ``errors`` on any process, every process raises
        that error (see :meth:`raise_together`). Blocks with collectives inside must not raise between them."""
        try:
            result, failure = fn(), None
        except errors as err:
            result, failure = None, err
        self.raise_together(failure)
        return result

    def from_main(self, fn: Callable[[], T], errors: tuple[type[BaseException], ...]) -> T:
        """``fn()`` on the main process only (a decision that must be the same everywhere: which checkpoint to
        resume, a lock only it takes); every process returns its result, or raises its error (one of
        ``errors``)."""
        result, failure = None, None
        if self.is_main_process:
            try:
                result = fn()
            except errors as err:
                failure = err
        if self.num_processes > 1:
            result, failure = self.gather_objects([(result, failure)])[0]
        if failure is not None:
            raise on_every_process(failure) from None
        return result


def on_every_process(err: BaseException) -> BaseException:
    """Marks ``err`` as raised by every process of the run alike (a check of the same inputs, or an error the
    processes agreed on): the main process alone reports it."""
    err.every_process = True
    return err


# what the launchers that accelerate reads set for a process's global rank (torchrun, Intel MPI / MPICH, Open MPI,
# MVAPICH)
RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def process_rank(environ=None) -> int:
    """This process's global rank as its launcher set it (0 when launched alone), readable before any process
    group exists."""
    env = os.environ if environ is None else environ
    return next((int(env[k]) for k in RANK_VARS if env.get(k, "").isdigit()), 0)


def exit_together(code: int) -> NoReturn:
    """Exits with ``code`` once the processes agreed to stop, or finished (0). Under a launcher that stops the
    other processes of a run when one exits (torchrun's SIGTERM), a process still on its way out ignores that
    signal, so every process ends with the same status instead of some with SIGTERM's. With several processes
    the exit skips the interpreter's teardown (``os._exit`` after flushing; every file the run wrote is closed
    by then): freeing the process groups' threads (gloo's; DeepSpeed keeps its groups past
    ``destroy_process_group``) can abort a process ("terminate called without an active exception", status
    -6) on a loaded machine, after it had succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os._exit(code)
    sys.exit(code)


# what the launchers that accelerate reads set for a process of a multi-process run (torchrun, Intel MPI /
# MPICH, Open MPI, MVAPICH)
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
ONE_MACHINE_HINT = ("on one machine use launch/accelerate/cpu_2proc.yaml (CPU) or launch/accelerate/multi_gpu.yaml, "
                    "or `accelerate launch --multi_gpu --num_processes N`")


def check_launch(environ=None) -> None:
    """Refuses a launch whose process count is not what it asked for (see the module).

    Raises:
        LaunchError: naming what was asked, what started, and the launch that does it.
    """
    env = os.environ if environ is None else environ
    started = next((int(env[k]) for k in WORLD_SIZE_VARS if k in env), 1)
    # accelerate's simple launcher sets MASTER_ADDR only when its config asks for several processes or machines
    if started == 1 and env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env:
        raise LaunchError(
            "accelerate started 1 process although its config asks for several: a CPU config (distributed_type: "
            "MULTI_CPU, or --cpu) starts them only through mpirun (mpirun_config); " + ONE_MACHINE_HINT
        )
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and env.get("FSDP_VERSION", "1") != "2":
        raise LaunchError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                          "(launch/accelerate/fsdp2.yaml)")
    local = int(env.get("LOCAL_WORLD_SIZE", "1"))
    if local > 1 and torch.cuda.is_available() and env.get("ACCELERATE_USE_CPU", "").lower() != "true":
        gpus = torch.cuda.device_count()
        if local > gpus:
            raise LaunchError(
                f"{local} processes on this machine but it has {gpus} GPU(s): pass --num_processes {gpus} (one "
                "process per GPU; the launch file's num_processes is the count on every machine together)"
            )


def process_group_kwargs() -> list:
    """gloo for several processes on a machine without CUDA (accelerate would otherwise pick a backend
    that needs GPUs, e.g. for DeepSpeed)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        return [InitProcessGroupKwargs(backend="gloo")]
    return []


def start(**accelerator_kwargs) -> tuple[Accelerator, Collectives]:
    """The ``Accelerator`` of this process and the :class:`Collectives` of the run.

    Raises:
        LaunchError: the processes were launched in a way that cannot synchronise.
    """
    check_launch()
    with without_lines(DEEPSPEED_BUILD_LINE):
        accelerator = Accelerator(kwargs_handlers=process_group_kwargs(), **accelerator_kwargs)
    comm = Collectives(accelerator)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and comm.manual:
        fsdp2_without_gpus(accelerator)
    return accelerator, comm


def fsdp2_without_gpus(accelerator: Accelerator) -> None:
    """Switches accelerate's state to FSDP2 where it reports no distributed setup (several processes on a
    machine without GPUs: accelerate enables FSDP for GPU launches only), with the plugin it would have made
    from the launch's ``FSDP_*`` variables; ``accelerator.prepare`` then shards the model as on GPUs (gloo).
    :class:`Collectives` goes on synchronising by hand, as it detected."""
    state = accelerator.state
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        state.fsdp_plugin.set_mixed_precision(accelerator.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as accelerate records it on GPUs


def shard_apart(accelerator: Accelerator, module: torch.nn.Module) -> None:
    """FSDP2: makes ``module`` (the prefix encoder) its own unit before ``accelerator.prepare`` shards the rest:
    in its parameters' own dtype (float32, whatever the backbone's mixed precision), its gradients reduced in
    float32, and gathered from its forward until the end of the backward (not re-gathered: its output is the
    gathered weight itself, which every layer's backward reads). On the mesh and with the offload policy
    accelerate uses for the other units."""
    plugin = accelerator.state.fsdp_plugin
    mesh = accelerator.torch_device_mesh
    if mesh is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    fully_shard(module, mesh=mesh, reshard_after_forward=False, mp_policy=MixedPrecisionPolicy(),
                offload_policy=plugin.cpu_offload)


def full_state(state: dict) -> dict:
    """An optimizer's ``state_dict()`` with every sharded tensor (a DTensor) gathered whole onto the CPU: the
    layout of a one-process run. A collective: every process calls it."""
    def whole(value):
        return value.full_tensor().cpu() if isinstance(value, DTensor) else value

    return {**state, "state": {k: {name: whole(v) for name, v in s.items()} for k, s in state["state"].items()}}


def sharded_state(state: dict, params: list[torch.nn.Parameter]) -> dict:
    """The reverse of :func:`full_state` for this process: each whole tensor of parameter ``i``'s state cut to
    the shard its parameter holds (``params`` in the optimizer's order; no communication: every process
    read the whole file)."""
    def shard(value, param):
        if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
            return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        return value

    return {**state, "state": {k: {name: shard(v, params[k]) for name, v in s.items()}
                               for k, s in state["state"].items()}}


def sharding_summary(model: torch.nn.Module) -> str:
    """The FSDP2 units of ``model`` by class, in module order (e.g. ``4 GLMBlock, PrefixEncoder``); the empty
    string for a model that is not sharded."""
    names = Counter(type(m).__name__.removeprefix("FSDP") for m in model.modules() if isinstance(m, FSDPModule))
    return ", ".join(f"{n} {name}" if n > 1 else name for name, n in names.items())


@contextmanager
def gathered_for_generation(model: torch.nn.Module) -> Iterator[None]:
    """FSDP2: every unit of ``model`` gathered for the block and not resharded after a forward, so each
    process may run its own number of forwards (it decodes its own rows); resharded as before afterwards.
    A no-op for a model that is not sharded. Costs the whole model's memory on every process meanwhile.

    FSDP2 has no public getter for a unit's ``reshard_after_forward``: each group's ``post_forward_mesh_info``
    (what ``set_reshard_after_forward`` sets) is kept and put back. The root is made the root first (FSDP2 takes
    the first module to run forward as the root, and the decode loop calls the prefix encoder alone)."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    # the root is decided by the first forward; generation also calls the prefix encoder alone
    units[0]._get_fsdp_state()._lazy_init()
    groups = [g for m in units for g in m._get_fsdp_state()._fsdp_param_groups]
    before = [g.post_forward_mesh_info for g in groups]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for group, info in zip(groups, before, strict=True):
            group.post_forward_mesh_info = info
        for unit in units:
            unit.reshard()


#: what DeepSpeed prints to stdout in every process when its communication backend starts (``DeepSpeed
#: deepspeed.ops.comm.deepspeed_shm_comm_op built successfully``): no result, and stdout carries the results
DEEPSPEED_BUILD_LINE = re.compile(r"DeepSpeed \S+ built successfully")


@contextmanager
def without_lines(pattern: re.Pattern) -> Iterator[None]:
    """Python-level stdout of the block without the lines that ``pattern`` matches in full; every other line is
    passed on when the block ends (also when it raises)."""
    real = sys.stdout
    captured = io.StringIO()
    try:
        with redirect_stdout(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines(keepends=True) if not pattern.fullmatch(line.strip())]
        if kept:
            real.write("".join(kept))
            real.flush()
