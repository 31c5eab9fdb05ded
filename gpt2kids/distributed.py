"""Data-parallel runs under `torchrun`: process group set-up and the few collectives the loop needs."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gpt2kids.device import resolve_device
from gpt2kids.errors import UserError


@contextlib.contextmanager
def _peers_answer() -> Iterator[None]:
    """A collective whose other side has exited fails with the transport's error (gloo: "Connection closed by
    peer"): one line instead, since the process that stopped first said why (rank 0's line, or its traceback)."""
    try:
        yield
    except RuntimeError as error:  # NCCL's DistBackendError is one too
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"another process of this torchrun run stopped ({first}); see its message") from None


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_name: str) -> Distributed:
        """Join the process group when torchrun started us (it sets WORLD_SIZE, RANK, LOCAL_RANK)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = (torch.cuda.is_available() and device_name == "auto") or device_name.startswith("cuda")
        if use_cuda:
            resolve_device(device_name)  # a --device that is not there: its one line, before any GPU is touched
            processes_here, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1)), torch.cuda.device_count()
            if gpus < processes_here:  # said by every process alike, so rank 0's line shows
                raise UserError(f"torchrun started {processes_here} processes on this machine but it has {gpus} "
                                f"GPU(s); pass --nproc_per_node={gpus}")
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
        return cls(rank, local_rank, world_size)

    def device_name(self, requested: str) -> str:
        """Each process drives its own GPU: the one numbered by its LOCAL_RANK."""
        if not self.enabled:
            return requested
        if requested.startswith("cuda:"):
            raise UserError(f"--device {requested} under torchrun would put every process on the same GPU; pass "
                            "--device cuda (each process takes GPU LOCAL_RANK) and choose the GPUs with "
                            "CUDA_VISIBLE_DEVICES")
        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return requested

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            with _peers_answer():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when any rank says True (e.g. a stop signal seen by one of them)."""
        if not self.enabled:
            return flag
        return bool(self.sum(torch.tensor([int(flag)], device=device)).item())

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value` (any picklable object), in rank order, on every process."""
        if not self.enabled:
            return [value]
        values: list[Any] = [None] * self.world_size
        with _peers_answer():
            dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        if not self.enabled:
            return value
        holder = [value]
        with _peers_answer():
            dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        if self.enabled:
            with _peers_answer():
                dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
