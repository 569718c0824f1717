"""Several training processes on PyTorch's own engine: `torchrun --nproc_per_node N -m veralab finetune ...`.

torchrun (or `accelerate launch`, which runs torchrun) starts N processes and tells each its place through
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...). `Cluster.from_environment()` joins
the process group (gloo on CPU, nccl on GPU), or returns a one-process cluster when started without torchrun,
so the training code is the same either way. Only rank 0 prints and writes files.

The shared projections `vera_A` / `vera_B` are never sent between processes: every rank draws them from
the same `projection_prng_key`, and `check_identical` compares a checksum across ranks once at start.

`sharding_request` decides between DistributedDataParallel (a whole base model per process) and FSDP2 (a
slice per process, `veralab.fast.fsdp`): `--fsdp`, or the FSDP settings `accelerate launch` puts in the
environment from its config file. accelerate's own FSDP path engages only on GPUs and other accelerators
(on CPU its `Accelerator` falls back to DistributedDataParallel), so veralab reads the settings and shards
itself, the same way on every device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import distributed as dist

from veralab.fast.dtensors import is_dtensor


@dataclass(frozen=True)
class Cluster:
    """This process's place among the training processes.

    Args:
        rank: this process's index, 0 .. world_size - 1.
        world_size: how many processes train together.
        device: where this process computes (its own GPU under nccl, else the CPU).
        owns_group: this cluster joined the process group, and `close` leaves it; a group the caller
            started (e.g. accelerate's `Accelerator`, or a script running several fine-tunes) stays open.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @classmethod
    def from_environment(cls) -> Cluster:
        """Join the process group torchrun describes in the environment; one process without torchrun."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        device = cls._device_for(int(os.environ.get("LOCAL_RANK", "0")))
        if world_size == 1:
            return cls(device=device)
        owns_group = not dist.is_initialized()
        if owns_group:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        return cls(
            rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, owns_group=owns_group
        )

    @staticmethod
    def _device_for(local_rank: int) -> torch.device:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, draws progress bars and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: list) -> list:
        """This rank's share of a global batch: items rank, rank + world_size, ... (every item exactly
        once)."""
        return items[self.rank :: self.world_size]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over every rank (float64, so counts and loss sums stay exact)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def check_identical(self, tensors: dict[str, torch.Tensor]) -> None:
        """Raise unless every rank holds bit-identical `tensors` (compares a checksum per tensor, not the
        data). Sharded tensors (DTensors) are left out: each rank holds its own slice of them by design.

        Args:
            tensors: name -> tensor, the same names on every rank.
        """
        tensors = {name: tensor for name, tensor in tensors.items() if not is_dtensor(tensor)}
        if not self.distributed or not tensors:
            return
        checksums = torch.stack([_checksum(t) for t in tensors.values()]).to(self.device)
        low, high = checksums.clone(), checksums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        differing = [
            name for name, lo, hi in zip(tensors, low.tolist(), high.tolist(), strict=True) if lo != hi
        ]
        if differing:
            raise RuntimeError(
                f"{differing} differ between training processes; every rank must build them identically "
                "(same model files, same projection_prng_key, same veralab and torch versions)"
            )

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if this cluster joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


@dataclass(frozen=True)
class ShardingRequest:
    """Shard the base model with FSDP2, and how.

    Args:
        reshard_after_forward: drop each decoder layer's gathered weights after its forward (and gather them
            again for the backward).
        source: what asked for it ("--fsdp" or "accelerate config").
    """

    reshard_after_forward: bool = True
    source: str = "--fsdp"


# accelerate's FSDP settings (environment variable, config file key) veralab's FSDP2 path cannot honour.
_UNSUPPORTED_ACCELERATE_SETTINGS = (
    ("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
    ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing"),
)
_RESHARD_VALUES = {"true": True, "full_shard": True, "false": False, "shard_grad_op": False}


def sharding_request(fsdp: bool, environ: Mapping[str, str] = os.environ) -> ShardingRequest | None:
    """FSDP2 when `--fsdp` was given or `accelerate launch` ran with an FSDP config; None for
    DistributedDataParallel.

    Of accelerate's FSDP settings, veralab reads `fsdp_version` (must be 2) and `fsdp_reshard_after_forward`;
    it always wraps each decoder layer (`TRANSFORMER_BASED_WRAP`), reads the base weights rank by rank (what
    `fsdp_cpu_ram_efficient_loading` is for) and gathers the adapter to rank 0 to save it. Settings it cannot
    honour are refused with the key to change.

    Args:
        fsdp: the `--fsdp` flag.
        environ: the environment (accelerate launch writes its config there).

    Raises:
        ValueError: an accelerate setting veralab cannot honour.
    """
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return ShardingRequest() if fsdp else None
    version = environ.get("FSDP_VERSION")
    if version is None:
        raise ValueError(
            "accelerate launch asked for FSDP without saying which version: accelerate before 1.6 runs FSDP1 "
            "only; pip install 'accelerate>=1.6' and set fsdp_version: 2 in the config's fsdp_config"
        )
    if version != "2":
        raise ValueError(
            f"the accelerate config asks for fsdp_version: {version}; veralab shards with FSDP2, set "
            "fsdp_version: 2 in its fsdp_config"
        )
    for variable, key in _UNSUPPORTED_ACCELERATE_SETTINGS:
        if environ.get(variable, "false").lower() == "true":
            raise ValueError(
                f"the accelerate config sets {key}: true, which veralab does not support; set it to false"
            )
    precision = environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision != "no":
        raise ValueError(
            f"the accelerate config sets mixed_precision: {precision}; veralab trains float32 lambdas over "
            "the base model's own dtype and does not autocast, set mixed_precision: 'no'"
        )
    wrap = environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if wrap != "TRANSFORMER_BASED_WRAP":
        raise ValueError(
            f"the accelerate config sets fsdp_auto_wrap_policy: {wrap}; veralab wraps each decoder layer, "
            "set TRANSFORMER_BASED_WRAP"
        )
    reshard = environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    if reshard not in _RESHARD_VALUES:
        raise ValueError(
            f"the accelerate config sets fsdp_reshard_after_forward: {reshard}; expected true or false"
        )
    return ShardingRequest(reshard_after_forward=_RESHARD_VALUES[reshard], source="accelerate config")


def _checksum(tensor: torch.Tensor) -> torch.Tensor:
    """A float64 fingerprint of the exact bits: the sum of the tensor's bytes weighted by their position."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).to(torch.float64)
    weights = torch.arange(1, data.numel() + 1, dtype=torch.float64).remainder_(9973).add_(1)
    return (data * weights).sum()
