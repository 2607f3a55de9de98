"""Multi-process training on torch.distributed: ``train.parallel: ddp | fsdp`` under torchrun.

    torchrun --nproc_per_node 8 scripts/finetune.py --cfg pick_place.yaml train.parallel=fsdp

* The process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT``): NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo
  on CPU. ``train.parallel=ddp|fsdp`` without torchrun runs a group of one process (FSDP2's CPU
  offload on a single GPU, say).
* ``ddp``: ``DistributedDataParallel`` (gradients as bucket views: no second gradient copy).
  Batch norm becomes ``SyncBatchNorm`` on CUDA; on CPU each rank normalizes over its own
  micro-batch (torch's SyncBatchNorm is GPU-only; docs/traps.md).
* ``fsdp``: FSDP2 ``fully_shard`` on every transformer block (language layers, and vision blocks
  where the encoder has them), then on the root; parameters, gradients and optimizer state are
  sharded over the ranks. With ``bf16`` the blocks compute in bf16 from fp32 master weights and
  reduce gradients in fp32 (``MixedPrecisionPolicy``); ``train.cpu_offload`` keeps parameters,
  gradients and optimizer state on the CPU (``CPUOffloadPolicy``).

``train.batch_size`` is the global batch: each rank draws ``batch_size / world_size / grad_accum``
samples per micro-batch from its shard of the same global order (``ResumableSampler``).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vla_ft.errors import ConfigError
from vla_ft.train.step import resolve_device

# Same block naming as the parameter depths (vla_ft.models.language): `<...>.layers.<i>` etc.
_BLOCK = re.compile(r"(?:^|\.|_)(?:layers|layer|h|blocks|block)\.\d+$")  # SmolVLA: vlm_layers.3
# Ranks waiting for rank 0's simulation evaluation or checkpoint write must not time out.
PG_TIMEOUT = timedelta(minutes=60)


@dataclass
class DistContext:
    """Where this process sits: mode, rank, world size and its device."""

    mode: str = "none"  # none | ddp | fsdp
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this process created the group (and destroys it)
    host_group: Any = None  # a gloo group for CPU flags when the main group is NCCL (None: main)

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a pickled Python object; small values only)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """Mean over ranks of 0-dim metric tensors (one all-reduce; called on log steps only).

        The values may sit on different devices (with FSDP CPU offload the gradient norm is computed
        on the CPU); they are gathered on the process group's device first."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        stacked = torch.stack([values[k].detach().float().reshape(()).to(self.device) for k in keys])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return {k: v / self.world_size for k, v in zip(keys, stacked)}

    def max_flag(self, flag: Tensor) -> Tensor:
        """The max of a 0-dim flag over ranks (so every rank skips a bad step together)."""
        if not self.enabled:
            return flag
        out = flag.clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def any_host(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank: a CPU all-reduce over gloo, so
        it never waits for the GPU (the stop-signal check after every step)."""
        if not self.enabled:
            return flag
        out = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(out.item())

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_distributed(parallel: str, device_name: str) -> DistContext:
    """Join (or create) the process group for ``train.parallel`` and pick this rank's device.

    Raises:
        ConfigError: torchrun started several processes but ``train.parallel=none``, or a device
            index was given while torchrun assigns one GPU per process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if parallel == "none":
        if world > 1:
            raise ConfigError(
                f"train.parallel=none but torchrun started {world} processes: set train.parallel=ddp "
                f"or train.parallel=fsdp (or run one process)"
            )
        return DistContext(device=resolve_device(device_name))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda"):
        if ":" in device_name and world > 1:
            raise ConfigError(
                f"train.device={device_name!r} with train.parallel={parallel}: torchrun gives each "
                f"process cuda:LOCAL_RANK; use train.device=cuda (or auto)"
            )
        index = int(device_name.split(":")[1]) if ":" in device_name else local_rank
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_name)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:  # no torchrun: a group of one
            kwargs.update(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        dist.init_process_group(backend, timeout=PG_TIMEOUT, **kwargs)
    host = dist.new_group(backend="gloo", timeout=PG_TIMEOUT) if dist.get_backend() != "gloo" else None
    return DistContext(parallel, dist.get_rank(), dist.get_world_size(), local_rank, device, owns, host)


def micro_batch_size(batch_size: int, grad_accum: int, world_size: int) -> int:
    """Per-rank micro-batch for a global ``batch_size``.

    Raises:
        ConfigError: ``batch_size`` is not a multiple of ``grad_accum * world_size``.
    """
    per = grad_accum * world_size
    if batch_size % per:
        lower, upper = (batch_size // per) * per, (batch_size // per + 1) * per
        hint = f"{lower} or {upper}" if lower else f"{upper}"
        raise ConfigError(
            f"train.batch_size={batch_size} is the global batch and must be a multiple of "
            f"train.grad_accum ({grad_accum}) x world size ({world_size}) = {per}: use e.g. {hint}"
        )
    return batch_size // per


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: elements of ``layers``/``blocks``/``h`` lists
    (transformers decoder and encoder layers, timm ViT blocks), outermost first; CNN stages are not
    blocks (they stay with the root)."""
    blocks, names = [], []
    for name, module in model.named_modules():
        if _BLOCK.search(name) and not any(name.startswith(n + ".") for n in names):
            blocks.append(module)
            names.append(name)
    return blocks


def wrap_model(policy: nn.Module, ctx: DistContext, precision: str, cpu_offload: bool = False) -> nn.Module:
    """DDP- or FSDP2-wrap ``policy`` (already on ``ctx.device``, identical on every rank).

    Returns the module the training step calls: a ``DistributedDataParallel`` around ``policy`` for
    ddp; ``policy`` itself, now sharded in place, for fsdp.
    """
    if ctx.mode == "ddp":
        if ctx.device.type == "cuda":
            policy = nn.SyncBatchNorm.convert_sync_batchnorm(policy)
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(policy, device_ids=ids, gradient_as_bucket_view=True)
    if ctx.mode != "fsdp":
        return policy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    if precision == "fp16":
        raise ConfigError(
            "train.precision=fp16 with train.parallel=fsdp is not supported (FSDP2 and the fp16 grad "
            "scaler): use train.precision=bf16 or fp32"
        )
    if ctx.device.type == "cuda":
        policy = nn.SyncBatchNorm.convert_sync_batchnorm(policy)
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16" else None,
        reduce_dtype=torch.float32,
    )
    offload = CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if cpu_offload else OffloadPolicy()
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for block in transformer_blocks(policy):
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
        for method in getattr(block, "FSDP_METHODS", ()):  # blocks used through methods, not forward
            register_fsdp_forward_method(block, method)
    fully_shard(policy, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return policy


def grad_sync_context(model: nn.Module, ctx: DistContext):
    """callable(is_last_micro_batch) -> context: DDP skips the all-reduce on all but the last
    micro-batch of a step. FSDP2 reduce-scatters every micro-batch (it keeps no unsharded
    gradients between them, which is its memory saving)."""
    if ctx.mode != "ddp":
        return None
    return lambda last: contextlib.nullcontext() if last else model.no_sync()
