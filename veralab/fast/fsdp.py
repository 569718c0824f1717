"""Sharding a VeRA model over processes with FSDP2 (`torch.distributed.fsdp.fully_shard`).

DistributedDataParallel keeps the whole base model on every process; FSDP2 keeps a slice of it on each, so a
model larger than one device's memory can be fine-tuned. The recipe, under `torchrun`:

    model = get_model(base, config)                      # base built on the meta device, or loaded
    shard_model(model)                                   # one FSDP unit per decoder layer, and the root
    materialize(model, "path/to/checkpoint")             # only if built on meta: veralab.fast.materialize
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ...train as usual: FSDP averages the gradients like DistributedDataParallel...
    model.save_pretrained("adapter", is_main_process=rank == 0)   # every process calls it; rank 0 writes

Where each tensor lives:

- **base weights**: sharded, dimension 0 split over the processes, per decoder layer and the root (embeddings,
  final norm, head). A unit's weights are gathered for its forward (and backward) and dropped after.
- **vera_A / vera_B**: plain buffers of the root VeraModel. FSDP2 shards parameters only and never sends
  buffers, so the pair stays whole and identical on every process without being broadcast, each step or
  ever: every process draws it from `projection_prng_key` (`materialize` compares a fingerprint across
  processes once).
- **lambdas**: sharded with their layer, as FSDP parameters. That is the cheapest arrangement: they travel
  in the all-gather the layer's weights need anyway (out + r values next to out x in), FSDP reduce-scatters
  their gradients in float32, and AdamW's state is sharded with them. Replicating them instead (FSDP's
  `ignored_params`) would need a gradient all-reduce of veralab's own for the same bytes. Saving gathers them
  (`veralab.fast.dtensors.full_tensor`): a few kilobytes.

Mixed precision: FSDP needs the *trainable* parameters of one unit to share a dtype. In a decoder layer those
are the lambdas alone (the base is frozen), so a bf16 base with float32 lambdas needs no special wrapping:
`mixed_precision_policy()` keeps every parameter in its own dtype for compute (`param_dtype=None`: the base in
bf16, the lambdas in float32, their master copy being what the optimizer updates) and reduces gradients in
float32. `param_dtype=torch.bfloat16` would instead run the lambdas in bf16 and round their gradients to bf16
before the reduction. Modules trained in full (`modules_to_save`) get units of their own; a unit whose
trainable parameters still mix dtypes (e.g. bf16 biases trained next to float32 lambdas) is refused with the
names.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from veralab.fast.dtensors import is_dtensor, is_sharded
from veralab.fast.layer import VeraLayer
from veralab.fast.modules_to_save import ModulesToSaveWrapper

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from veralab.fast.model import VeraModel


# The oldest torch whose FSDP2 trains VeRA as one process does. torch 2.7 refuses a unit whose frozen
# parameters (a bf16 base) and trainable ones (float32 lambdas) differ in dtype; on torch 2.8 two sharded
# processes trained other lambdas than one process on the same global batch, by more than float32 summation
# order explains (veralab's FSDP tests, gloo on the CPU). Both hold from 2.9 on.
FSDP2_TORCH = (2, 9)


def check_torch_for_fsdp2() -> None:
    """Raise RuntimeError, naming the release it needs, where the installed torch is older than FSDP2_TORCH.

    DistributedDataParallel (a whole base model per process) has no such floor.
    """
    release = tuple(int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    if release < FSDP2_TORCH:
        needed = ".".join(map(str, FSDP2_TORCH))
        raise RuntimeError(
            f"sharding with FSDP2 needs torch >= {needed}, and this is torch {torch.__version__}: upgrade it "
            f"(pip install 'torch>={needed}'), or train without sharding (DistributedDataParallel, a whole "
            "base model per process, works on this torch)"
        )


def mixed_precision_policy(reduce_dtype: torch.dtype = torch.float32) -> MixedPrecisionPolicy:
    """Each parameter computes in its own dtype (bf16 base, float32 lambdas); gradients are reduced in
    `reduce_dtype`.

    Args:
        reduce_dtype: the dtype of the gradient reduce-scatter (float32 keeps the lambdas' gradients exact to
            float32 summation order).
    """
    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce_dtype)


def decoder_layers(model: VeraModel) -> list[nn.Module]:
    """The repeated blocks of the wrapped model, one FSDP unit each.

    transformers names them in `_no_split_modules` (e.g. LlamaDecoderLayer, GPT2Block); a model without that
    list gets the entries of its module lists that hold a VeRA layer.
    """
    base = model.get_base_model()
    block_names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [module for module in base.modules() if type(module).__name__ in block_names]
    if blocks:
        return blocks
    return [
        block
        for module in base.modules()
        if isinstance(module, nn.ModuleList)
        for block in module
        if any(isinstance(inner, VeraLayer) for inner in block.modules())
    ]


def shard_model(
    model: VeraModel,
    *,
    mesh: DeviceMesh | None = None,
    reshard_after_forward: bool = True,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> VeraModel:
    """Shard `model` in place with FSDP2: one unit per decoder layer, one per `modules_to_save` module, the
    root (see the module docstring). Call it before building the optimizer (the parameters become DTensors).

    Afterwards `model.generate` gathers the root's weights like `model(...)` does; under several processes
    pass `synced_gpus=True` to `generate` so that every process runs the same number of forwards.

    Args:
        model: a VeraModel with every adapter it will train already added (a sharded model cannot grow).
        mesh: the processes to shard over (default: all of them).
        reshard_after_forward: drop each decoder layer's gathered weights after its forward (and gather them
            again for the backward): less memory, more communication.
        mp_policy: the mixed precision (default: `mixed_precision_policy()`).

    Raises:
        RuntimeError: torch is older than 2.9 (`check_torch_for_fsdp2`), or torch.distributed is not
            initialized (start the processes with torchrun).
        ValueError: the model is already sharded, or a unit's trainable parameters mix dtypes.
    """
    check_torch_for_fsdp2()
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            "shard_model needs torch.distributed initialized: start the processes with torchrun (or "
            "accelerate launch) and call torch.distributed.init_process_group() first"
        )
    if is_sharded(model):
        raise ValueError("the model is already sharded; shard_model runs once, before the optimizer is built")
    units = [*decoder_layers(model), *(m for m in model.modules() if isinstance(m, ModulesToSaveWrapper))]
    _check_trainable_dtypes(model, units)
    policy = mp_policy if mp_policy is not None else mixed_precision_policy()
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "generate")
    for _, layer in model.vera_layers():
        layer.keep_lambda_forms = False
    return model


def _check_trainable_dtypes(model: VeraModel, units: list[nn.Module]) -> None:
    """Every unit's trainable parameters (those not in an inner unit) share one dtype, as FSDP requires."""
    owner: dict[int, str] = {}
    for index, unit in enumerate([*units, model]):  # innermost first: a parameter belongs to its first unit
        for param in unit.parameters():
            owner.setdefault(id(param), str(index))
    by_unit: dict[str, dict[torch.dtype, list[str]]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            by_unit.setdefault(owner[id(param)], {}).setdefault(param.dtype, []).append(name)
    for dtypes in by_unit.values():
        if len(dtypes) > 1:
            examples = {str(dtype): names[0] for dtype, names in dtypes.items()}
            raise ValueError(
                f"FSDP needs the trainable parameters of one unit to share a dtype, but one decoder layer "
                f"trains {examples}: cast them to one dtype (e.g. model.get_base_model() biases to float32) "
                "or train fewer of them (bias='none')"
            )


@dataclass(frozen=True)
class ResidentBytes:
    """What one process keeps of the model between steps, in bytes (each storage counted once, padding
    included).

    Args:
        base: the frozen base weights (this process's shards when sharded).
        adapter: the lambdas of every adapter, and whatever else trains (modules_to_save copies, biases).
        projections: vera_A and vera_B of every projection group (whole on every process).
        buffers: the base model's other buffers (e.g. rotary frequencies).
    """

    base: int
    adapter: int
    projections: int
    buffers: int


def resident_bytes(model: VeraModel) -> ResidentBytes:
    """This process's `ResidentBytes`: for a sharded model the local shards, as they sit in memory."""
    seen: set[int] = set()

    def storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
        total = 0
        for tensor in tensors:
            local = tensor.to_local() if is_dtensor(tensor) else tensor
            storage = local.untyped_storage()
            if storage.data_ptr() not in seen and storage.nbytes():
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    params = dict(model.named_parameters())
    trained = {name for name, p in params.items() if p.requires_grad or model.prefix in name}
    projections = storage_bytes(
        t for pair, _ in model.projection_groups() for t in (pair.vera_A, pair.vera_B)
    )
    return ResidentBytes(
        base=storage_bytes(p for name, p in params.items() if name not in trained),
        adapter=storage_bytes(params[name] for name in trained),
        projections=projections,
        buffers=storage_bytes(model.buffers()),
    )
