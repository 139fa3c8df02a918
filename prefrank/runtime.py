"""What a scoring run and a training run set up alike: the processes of a torchrun job, the device
each one uses, the models and tokenizer, and the longest sequence they allow.

Under torchrun (gloo on CPU, nccl on CUDA) every process runs the same code; rank 0 writes what is
shared (the table, the checkpoints) and speaks for all. On CUDA each process takes the GPU
LOCAL_RANK names, unless the device option names one.
"""
import os
from datetime import timedelta

import torch

from prefrank.errors import InputError
from prefrank.models import CausalLM, LoadOptions, load_model, load_tokenizer, resolve_device


def distributed() -> tuple[int, int]:
    """(rank, world size): torch.distributed under torchrun (gloo on CPU, nccl on CUDA), else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        # generous timeout: ranks wait for each other only at the start and at the end
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=24))
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int):
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def on_rank_0(step, rank: int, world: int, device: torch.device):
    """Run `step` on rank 0 only; an InputError it raises then stops every rank (none waits for a
    rank 0 that has stopped). Doubles as a barrier."""
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
            raise InputError(f"rank 0 stopped: {message[0]}")
    if error is not None:
        raise error


def process_device(spec: str, world: int) -> torch.device:
    """The device of this process: `spec` (auto, cpu, cuda, cuda:N), and under torchrun on CUDA
    without an index, the GPU of this process's LOCAL_RANK."""
    device = resolve_device(spec)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def load_lm(path: str, opts: LoadOptions, device: torch.device, dtype: torch.dtype) -> CausalLM:
    return CausalLM(load_model(path, dtype=dtype, device=device, trust_remote_code=opts.trust_remote_code,
                               allow_pickle=opts.allow_pickle))


def load_run_tokenizer(opts: LoadOptions, model_path: str):
    """The tokenizer of a run: <tokenizer>, else the policy model's, with <chat_template>."""
    return load_tokenizer(opts.tokenizer or model_path, trust_remote_code=opts.trust_remote_code,
                          chat_template=opts.chat_template)


def max_length(limit: int | None, *lms: CausalLM | None) -> int | None:
    """The longest sequence a run scores: the given limit and every model's positions, the least."""
    limits = [m for m in (limit, *(lm.max_positions for lm in lms if lm is not None)) if m]
    return min(limits) if limits else None
