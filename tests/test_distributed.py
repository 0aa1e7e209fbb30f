"""``sync=true`` norms on 2 CPU processes (gloo) against one process on the concatenated batch.

Each case is a small conv net around the norm, trained one SGD step under DistributedDataParallel: the output,
loss, input and parameter gradients, running statistics and updated weights of the two replicas together must equal
those of one process that sees both halves of the batch. The processes are spawned once for all cases.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from normzoo.distributed import ChannelReduce, SyncedChannelReduce, local_statistics, sync_active
from normzoo.norms.base import create_norm

SYNCED = ["bn:sync=true", "lp:inf,sync=true", "noisy-bn:sync=true", "lp:1,centered=true,sync=true",
          "lp:3,sync=true", "l1-bn:sync=true", "topk-bn:5,sync=true", "noisy-bn:where=before,sync=true",
          "noisy-bn:recompute=true,sync=true", "noisy-bn:bn=false",
          "mean-bn:sync=true"]  # the last: the example plugin's norm
WORLD = 2
BATCH, C, HW = 8, 3, 5


def small_net(spec: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, C, 3, padding=1), create_norm(spec, C), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, 4))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 2, HW, HW, generator=generator), torch.randint(0, 4, (BATCH,), generator=generator)


def one_step(spec: str, rows: slice, wrap=lambda m: m) -> dict[str, torch.Tensor]:
    """One SGD step of ``small_net(spec)`` on ``batch()[rows]``; everything worth comparing, by name."""
    net = small_net(spec)
    model = wrap(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = batch()
    x = x[rows].clone().requires_grad_()
    torch.manual_seed(2)  # the same noise stream in every process
    out = model(x)
    loss = nn.functional.cross_entropy(out, y[rows])
    loss.backward()
    result = {"out": out.detach(), "loss": loss.detach().reshape(1), "x_grad": x.grad}
    result |= {f"grad.{k}": p.grad for k, p in net.named_parameters()}
    opt.step()
    result |= {f"after.{k}": v.detach().clone() for k, v in net.state_dict().items()}
    return result


def _replica(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        share = BATCH // WORLD
        rows = slice(rank * share, (rank + 1) * share)
        for i, spec in enumerate(SYNCED):
            result = one_step(spec, rows, lambda m: nn.parallel.DistributedDataParallel(m))
            save_file({k: v.contiguous() for k, v in result.items()}, os.path.join(out_dir, f"{i}-{rank}.safetensors"))
        # Replicas of unequal size: 3 and 5 samples.
        x = batch()[0][:3] if rank == 0 else batch()[0][3:]
        reduce = SyncedChannelReduce()
        save_file({"mean": reduce.mean(x), "count": torch.tensor(reduce.count(x))},
                  os.path.join(out_dir, f"unequal-{rank}.safetensors"))
        with local_statistics():
            save_file({"local": torch.tensor(float(sync_active(True)))},
                      os.path.join(out_dir, f"local-{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("replicas")
    mp.start_processes(_replica, args=(str(out / "init"), str(out)), nprocs=WORLD, start_method="spawn")
    return out


@pytest.mark.parametrize("index,spec", list(enumerate(SYNCED)), ids=SYNCED)
def test_synced_step_equals_one_process_on_the_concatenated_batch(replicas, index, spec):
    whole = one_step(spec, slice(None))
    parts = [load_file(replicas / f"{index}-{rank}.safetensors") for rank in range(WORLD)]
    # Each replica's loss is the mean over its half; DDP averages the parameter gradients over replicas.
    torch.testing.assert_close(torch.cat([p["out"] for p in parts]), whole["out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(p["loss"] for p in parts) / WORLD, whole["loss"])
    torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]) / WORLD, whole["x_grad"],
                               rtol=1e-4, atol=1e-6)
    for key in whole:
        if key.startswith(("grad.", "after.")):
            for rank, part in enumerate(parts):
                torch.testing.assert_close(part[key], whole[key], rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{spec} rank {rank} {key}: {m}")


def test_unsynced_bn_differs_from_the_concatenated_batch():
    """The control: the same comparison fails when each half is normalized on its own."""
    whole = one_step("bn", slice(None))
    halves = torch.cat([one_step("bn", slice(0, 4))["out"], one_step("bn", slice(4, 8))["out"]])
    assert not torch.allclose(halves, whole["out"], atol=1e-3)


def test_replicas_of_unequal_size_reduce_exactly(replicas):
    x = batch()[0]
    for rank in range(WORLD):
        part = load_file(replicas / f"unequal-{rank}.safetensors")
        assert int(part["count"]) == BATCH * HW * HW
        torch.testing.assert_close(part["mean"], ChannelReduce().mean(x))


def test_local_statistics_turns_sync_off_inside_a_process_group(replicas):
    assert all(float(load_file(replicas / f"local-{r}.safetensors")["local"]) == 0.0 for r in range(WORLD))


def test_sync_without_a_process_group_is_the_plain_norm():
    assert not dist.is_initialized()
    for spec in ("bn", "lp:inf", "topk-bn:3", "noisy-bn"):
        synced_spec = spec + (",sync=true" if ":" in spec else ":sync=true")
        plain, synced = one_step(spec, slice(None)), one_step(synced_spec, slice(None))
        for key in plain:
            torch.testing.assert_close(synced[key], plain[key], msg=lambda m: f"{spec} {key}: {m}")
