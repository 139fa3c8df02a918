"""What a scoring run and a training run set up alike: the processes of a torchrun job, the device
each one uses, the models and tokenizer, and the longest sequence they allow.

Under torchrun (gloo on CPU, nccl on CUDA) every process runs the same code; rank 0 writes what is
shared (the table, the checkpoints) and speaks for all. On CUDA each process takes the GPU
LOCAL_RANK names, unless the device option names one. With tensor parallelism (`Layout.tp` > 1)
the processes form data-parallel groups of `tp` consecutive ranks, each group holding one sharded
copy of every model (transformers' tensor-parallel plans on DTensor).
"""
import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from prefrank.errors import InputError, Stopped
from prefrank.models import CausalLM, LoadOptions, load_model, load_tokenizer, resolve_device


def distributed() -> tuple[int, int]:
    """(rank, world size): torch.distributed under torchrun (gloo on CPU, nccl on CUDA), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        # torch.distributed.nn.functional takes the default group as its functions' default argument
        # when first imported (transformers imports it while loading a model): imported after the
        # group exists, it keeps the group alive past destroy_process_group, whose gloo threads then
        # free a collective's tensors during the interpreter's exit and abort the process (SIGABRT,
        # "terminate called without an active exception"). Imported now, it holds no group.
        import torch.distributed.nn.functional  # noqa: F401
        # generous timeout: ranks wait for each other only at the start and at the end
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=24))
    return dist.get_rank(), dist.get_world_size()


@dataclass(frozen=True)
class Layout:
    """Where this process sits in the job: `world` processes in `groups` data-parallel groups of `tp`
    tensor-parallel ranks. The ranks of a group are consecutive (rank // tp is the group), as in
    transformers' device mesh, whose innermost dimension is the tensor-parallel one; the group's
    first rank (its leader) writes what the group computes."""
    rank: int
    world: int
    tp: int = 1

    @property
    def group(self) -> int:
        return self.rank // self.tp

    @property
    def groups(self) -> int:
        return self.world // self.tp

    @property
    def leader(self) -> bool:
        return self.rank % self.tp == 0


def layout(tp: int) -> Layout:
    """This process's Layout under `tp`-way tensor parallelism (1: none)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % tp:
        raise InputError(f"<tp> {tp} needs a torchrun job of a multiple of {tp} processes (e.g. torchrun "
                         f"--nproc-per-node {tp} -m prefrank score ...); this one has {world}")
    return Layout(*distributed(), tp)


def shutdown():
    """End this process's part in a torchrun job, if it has one: a process group left to the
    interpreter's exit can abort it (gloo's threads outlive it)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: int):
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def on_rank_0(step, rank: int, world: int, device: torch.device):
    """Run `step` on rank 0 only; an InputError it raises then stops every rank (none waits for a
    rank 0 that has stopped), rank 0 saying it. Doubles as a barrier."""
    error = None
    if rank == 0:
        try:
            step()
        except InputError as e:
            error = e
    if world > 1:
        import torch.distributed as dist
        message = [None if error is None else str(error)]
        dist.broadcast_object_list(message, src=0, device=device if device.type == "cuda" else None)
        if rank != 0 and message[0] is not None:
            raise Stopped(f"rank 0 stopped: {message[0]}")
    if error is not None:
        raise error


def stop_together(error: InputError | None, order: int, world: int, device: torch.device, cleanup):
    """The end of a round of work on every rank of a torchrun job, where an InputError met by any
    rank (`error`, at position `order` in the input) stops them all: rank 0 runs `cleanup`, every
    rank waits for it (torchrun ends the others as soon as one rank exits), then rank 0 raises the
    error met first in the input and the others raise Stopped, so the job says it in one line. A
    collective: every rank calls it once per round, a rank that met an error at once."""
    import torch.distributed as dist
    rank = dist.get_rank()
    none = torch.iinfo(torch.int64).max
    first = torch.tensor([none if error is None else order * world + rank],
                         device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    if int(first) == none:
        return
    message = [error]
    dist.broadcast_object_list(message, src=int(first) % world, device=device if device.type == "cuda" else None)
    if rank == 0:
        cleanup()
    dist.all_reduce(first)  # a barrier on the device the job's collectives use
    if rank == 0:
        raise message[0]
    raise Stopped(str(message[0]))


def process_device(spec: str, world: int) -> torch.device:
    """The device of this process: `spec` (auto, cpu, cuda, cuda:N), and under torchrun on CUDA
    without an index, the GPU of this process's LOCAL_RANK."""
    device = resolve_device(spec)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def tensor_parallel_config(where: Layout):
    """transformers' DistributedConfig for `where`'s groups: each model sharded over its group's
    `tp` ranks and replicated across the groups (dp_replicate_size, which replicates through
    FSDP2's hybrid mode: at inference it adds no communication between the groups, so each group
    scores its own chunks at its own pace). None without tensor parallelism."""
    if where.tp == 1:
        return None
    from transformers.distributed import DistributedConfig
    if where.groups == 1:
        return DistributedConfig(tp_size=where.tp)
    if "dp_replicate_size" not in {f.name for f in dataclasses.fields(DistributedConfig)}:
        import transformers
        raise InputError(f"<tp> {where.tp} with {where.groups} data-parallel groups needs a transformers whose "
                         f"DistributedConfig has dp_replicate_size (5.24 has it; this is {transformers.__version__}): "
                         f"upgrade it, or run as many processes as <tp>")
    return DistributedConfig(tp_size=where.tp, dp_replicate_size=where.groups)


def load_lm(path: str, opts: LoadOptions, device: torch.device, dtype: torch.dtype,
            where: Layout | None = None) -> CausalLM:
    """The model at `path` on `device`, or sharded over `where`'s tensor-parallel group."""
    return CausalLM(load_model(path, dtype=dtype, device=device, trust_remote_code=opts.trust_remote_code,
                               allow_pickle=opts.allow_pickle,
                               distributed_config=tensor_parallel_config(where) if where else None),
                    tensor_parallel=where is not None and where.tp > 1)


def load_run_tokenizer(opts: LoadOptions, model_path: str):
    """The tokenizer of a run: <tokenizer>, else the policy model's, with <chat_template>."""
    return load_tokenizer(opts.tokenizer or model_path, trust_remote_code=opts.trust_remote_code,
                          chat_template=opts.chat_template)


def max_length(limit: int | None, *lms: CausalLM | None) -> int | None:
    """The longest sequence a run scores: the given limit and every model's positions, the least."""
    limits = [m for m in (limit, *(lm.max_positions for lm in lms if lm is not None)) if m]
    return min(limits) if limits else None
