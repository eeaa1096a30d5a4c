"""The process's place among the search's processes: its rank, world size, device and process group.

torchrun (or consa.search.distributed.helpers, in a worker that owns several GPUs) sets RANK,
WORLD_SIZE and LOCAL_RANK; one process alone is rank 0 of 1 and every operation here is a no-op.
Loading (sharded weights) and the search both need this, so it sits below both.
"""

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return (dist.get_rank() if dist.is_available() and dist.is_initialized() else env_rank()) == 0


class DataParallel:
    """The search's view of its process group; with one process every operation is a no-op."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, order: torch.Tensor, step: int, batch_size: int) -> torch.Tensor:
        """This rank's row indices for `step`: (batch_size,)."""
        first = (step * self.world_size + self.rank) * batch_size
        return order[(first + torch.arange(batch_size)) % len(order)]

    def reduce_step(self, grad: torch.Tensor, loss: torch.Tensor, cancel: bool) -> tuple[torch.Tensor, float, bool]:
        """Average the gate gradient and the task loss over ranks, and OR the cancel flags: one all-reduce."""
        if self.world_size == 1:
            return grad, loss.item(), cancel
        flat = torch.cat([grad.flatten(), loss.detach().float().reshape(1),
                          torch.tensor([float(cancel)], device=grad.device)])
        dist.all_reduce(flat)  # SUM: gloo has no AVG
        flat[:-1] /= self.world_size
        return flat[:-2].view_as(grad), flat[-2].item(), flat[-1].item() > 0


def data_parallel(device) -> DataParallel:
    """The process group of this search: joined from the environment (torchrun or `helpers`), else one process."""
    if env_world_size() <= 1 and not (dist.is_available() and dist.is_initialized()):
        return DataParallel()
    if not dist.is_initialized():
        device = torch.device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return DataParallel(dist.get_rank(), dist.get_world_size())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device() -> torch.device:
    """This process's device: the GPU of its local rank (torchrun sets LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def pick_device(name: str = "auto") -> torch.device:
    """A device by name; "auto" is this process's own device (its GPU under torchrun)."""
    return local_device() if name == "auto" else torch.device(name)
