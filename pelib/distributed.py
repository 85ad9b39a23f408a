"""Data-parallel training over several processes, the standard way: torchrun (or `accelerate
launch`) starts W copies of the same command, accelerate joins them in one process group (gloo on
a CPU, nccl on GPUs), and DistributedDataParallel averages the gradients.

    torchrun --nproc_per_node 2 -m pelib finetune --method lora ...

What pelib.train does with W processes (rank r of W):
  * every process draws the same global batches (same seed), and runs only its shard of each,
    rows r, r + W, r + 2W, ... of the batch;
  * the shard's mean loss is scaled by n_r W / N (n_r rows of the batch's N), so that DDP's
    average over processes, (1/W) sum_r (n_r W / N) grad(mean_r), is the gradient of the global
    batch's mean loss: the same update as one process with the same global batch;
  * hooks that read gradients (AdaLoRA's allocator, SoRA's prox) run after the all-reduce, so
    every process sees the averaged gradients and keeps identical weights;
  * evaluation is sharded and gathered, so the metrics cover the split once;
  * only rank 0 writes results, checkpoints and adapters.
With one process (no WORLD_SIZE in the environment) nothing here is used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ProcessGroup:
    rank: int = 0
    world: int = 1
    accelerator: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, index: list[int]) -> list[int]:
        return index[self.rank::self.world]

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model every process runs forward/backward through (DDP when W > 1)."""
        if self.world == 1:
            return model
        return self.accelerator.prepare_model(model)

    def mean(self, value: float) -> float:
        """The mean of a float over the processes."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(t)
        return t.item() / self.world

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def process_group() -> ProcessGroup:
    """This process's place: (0, 1) alone; under torchrun / accelerate launch, its rank of W."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ProcessGroup()
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    return ProcessGroup(acc.process_index, acc.num_processes, acc)


def check_launch(env=os.environ) -> None:
    """A rank belongs to a world: RANK without WORLD_SIZE (a stray variable, no torchrun) would
    run a process that waits for rank 0's results and writes nothing. Refuse it up front."""
    rank, world = env.get("RANK"), env.get("WORLD_SIZE")
    if rank is None and world is None:
        return
    try:
        r, w = int(rank or 0), int(world or 1)
    except ValueError:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} must be integers (torchrun sets "
                         "them); unset both to run one process") from None
    if not 0 <= r < w:
        raise ValueError(f"RANK={r} with WORLD_SIZE={world or 'unset'}: rank {r} needs a world of "
                         f"more than {r} processes; unset RANK to run one process, or start the "
                         "run with torchrun")


def rank() -> int:
    """This process's rank without joining a group (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def finish() -> None:
    """Leave the process group at the end of a run: wait for every process (rank 0 may still be
    writing), then tear the group down. A process that exits with gloo's threads still running
    can abort ("terminate called without an active exception"), and torchrun then fails the
    whole run although every result was written."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
