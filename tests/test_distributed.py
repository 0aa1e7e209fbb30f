"""``sync=true`` norms on 2 CPU processes (gloo) against one process on the concatenated batch.

Each case is a small conv net around the norm, trained one SGD step under DistributedDataParallel: the output,
loss, input and parameter gradients, running statistics and updated weights of the two replicas together must equal
those of one process that sees both halves of the batch. The processes are forked once for all cases (they
share this process's imports, so no interpreter start-up is paid).
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
from normzoo.testing import SYNC_BATCH, assert_replicas_equal_one_process, sync_batch, sync_step

SYNCED = ["bn:sync=true", "lp:inf,sync=true", "noisy-bn:sync=true", "lp:1,centered=true,sync=true",
          "lp:3,sync=true", "l1-bn:sync=true", "topk-bn:5,sync=true", "noisy-bn:where=before,sync=true",
          "noisy-bn:recompute=true,sync=true", "noisy-bn:bn=false",
          "mean-bn:sync=true"]  # the last: the example plugin's norm
WORLD = 2
HW = 5  # the kit's sync batch: (8, 2, 5, 5)


def _replica(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        share = SYNC_BATCH // WORLD
        rows = slice(rank * share, (rank + 1) * share)
        for i, spec in enumerate(SYNCED):
            result = sync_step(spec, rows, lambda m: nn.parallel.DistributedDataParallel(m))
            save_file({k: v.contiguous() for k, v in result.items()}, os.path.join(out_dir, f"{i}-{rank}.safetensors"))
        # Replicas of unequal size: 3 and 5 samples.
        x = sync_batch()[0][:3] if rank == 0 else sync_batch()[0][3:]
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
    mp.start_processes(_replica, args=(str(out / "init"), str(out)), nprocs=WORLD, start_method="fork")
    return out


@pytest.mark.parametrize("index,spec", list(enumerate(SYNCED)), ids=SYNCED)
def test_synced_step_equals_one_process_on_the_concatenated_batch(replicas, index, spec):
    parts = [load_file(replicas / f"{index}-{rank}.safetensors") for rank in range(WORLD)]
    assert_replicas_equal_one_process(spec, parts, sync_step(spec, slice(None)))


def test_unsynced_bn_differs_from_the_concatenated_batch():
    """The control: the same comparison fails when each half is normalized on its own."""
    whole = sync_step("bn", slice(None))
    halves = torch.cat([sync_step("bn", slice(0, 4))["out"], sync_step("bn", slice(4, 8))["out"]])
    assert not torch.allclose(halves, whole["out"], atol=1e-3)


def test_replicas_of_unequal_size_reduce_exactly(replicas):
    x = sync_batch()[0]
    for rank in range(WORLD):
        part = load_file(replicas / f"unequal-{rank}.safetensors")
        assert int(part["count"]) == SYNC_BATCH * HW * HW
        torch.testing.assert_close(part["mean"], ChannelReduce().mean(x))


def test_local_statistics_turns_sync_off_inside_a_process_group(replicas):
    assert all(float(load_file(replicas / f"local-{r}.safetensors")["local"]) == 0.0 for r in range(WORLD))


def test_sync_without_a_process_group_is_the_plain_norm():
    assert not dist.is_initialized()
    for spec in ("bn", "lp:inf", "topk-bn:3", "noisy-bn"):
        synced_spec = spec + (",sync=true" if ":" in spec else ":sync=true")
        plain, synced = sync_step(spec, slice(None)), sync_step(synced_spec, slice(None))
        for key in plain:
            torch.testing.assert_close(synced[key], plain[key], msg=lambda m: f"{spec} {key}: {m}")
