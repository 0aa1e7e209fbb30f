"""How the per-channel kernels tile a batch: an (N, C, H, W) or (N, C) tensor read as R = N·H·W rows of C channels.

Every kernel of this package runs on a grid of (channel blocks, row splits): program (i, j) handles ``block_c``
channels and the rows ``[j·rows_per_split, (j+1)·rows_per_split)``, in tiles of ``block_r`` rows. Row r is sample
``r // HW``, spatial position ``r % HW``; a value's address is ``n·stride_n + c·stride_c + hw·stride_hw``, so NCHW
and channels_last tensors (any layout where H and W merge into one stride) are read in place. Statistics passes
write one partial result per (split, channel), which a finalize kernel combines in a fixed order: the result does
not depend on scheduling (no floating-point atomics).

This module also names the rows of the small per-channel buffers the kernels pass to each other. Nothing here
imports Triton.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Per-channel partial results of a statistics pass: (splits, PARTS, C) float32.
PARTS = 4
# Per-channel coefficients of the normalize pass (COEFS, C): out = (x − MEAN)·A + β with A = γ/d; x̂ = (x − MEAN)·INV.
# (x − µ first: with a tiny d, x·A + (β − µA) would cancel catastrophically.)
COEF_A, COEF_MEAN, COEF_INV, COEF_GAMMA, COEF_BETA = range(5)
COEFS = 5
# What the forward saves for the backward besides mean and scale (AUX_ROWS, C): top-k's threshold, tie weight and
# Σ sign over the selection, and the number of values per channel (all replicas' under synced statistics).
AUX_T, AUX_W, AUX_SIGN, AUX_N = range(4)
AUX_ROWS = 4
# Per-channel coefficients of the backward's elementwise pass (DCOEFS, C): dx = g·A + E + F·φ(z), threshold, weight.
DCOEF_A, DCOEF_E, DCOEF_F, DCOEF_T, DCOEF_W = range(5)
DCOEFS = 5
# Options of every launch: multiply-adds contract to FMAs (Triton's default so far, stated so that it stays, and so
# that Triton 3.9 does not warn about the default changing).
LAUNCH = {"enable_fp_fusion": True}

_overrides: dict[str, int] = {}


@dataclass(frozen=True)
class Tiling:
    rows: int  # R = N·H·W values per channel
    hw: int  # H·W
    channels: int
    block_r: int  # rows per tile (a power of two)
    block_c: int  # channels per tile (a power of two)
    splits: int  # row splits: programs per channel block
    rows_per_split: int  # a multiple of block_r
    num_warps: int
    group: int = 1  # rows per group of the top-k statistics' group extrema (divides block_r; set by its launcher)

    @property
    def channel_blocks(self) -> int:
        return -(-self.channels // self.block_c)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.channel_blocks, self.splits)

    @property
    def groups(self) -> int:
        """Groups of ``group`` rows per channel (the last one may be partial)."""
        return -(-self.rows // self.group)


def mergeable(t: torch.Tensor) -> bool:
    """Whether H and W of a 4-D tensor merge into one stride (NCHW and channels_last do); 2-D always."""
    if t.dim() == 2:
        return True
    _, _, H, W = t.shape
    return H == 1 or W == 1 or t.stride(2) == W * t.stride(3)


def strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(stride_n, stride_c, stride_hw) of a 2-D or a :func:`mergeable` 4-D tensor."""
    if t.dim() == 2:
        return t.stride(0), t.stride(1), 1
    _, _, H, W = t.shape
    return t.stride(0), t.stride(1), t.stride(2) if W == 1 else t.stride(3)


def tiling(t: torch.Tensor) -> Tiling:
    """The tiling of ``t`` (2-D or mergeable 4-D) for the device it lives on."""
    N, C = t.shape[:2]
    hw = t.shape[2] * t.shape[3] if t.dim() == 4 else 1
    rows = N * hw
    channel_contiguous = strides(t)[1] == 1 and C > 1
    if channel_contiguous:  # channels_last, or (N, C): a warp reads consecutive channels of one row
        block_c = min(_pow2(C), 32)
        block_r = min(max(2048 // block_c, 1), _pow2(rows))
    else:  # NCHW: a warp reads consecutive positions of one channel
        block_c = 1
        block_r = min(2048, _pow2(rows))
    block_r = _overrides.get("block_r", block_r)
    block_c = _overrides.get("block_c", block_c)
    channel_blocks = -(-C // block_c)
    tiles = -(-rows // block_r)
    splits = min(max(_target_programs(t.device) // channel_blocks, 1), tiles)
    splits = _overrides.get("splits", splits)
    rows_per_split = -(-tiles // splits) * block_r
    splits = -(-rows // rows_per_split)  # no empty split
    return Tiling(rows, hw, C, block_r, block_c, splits, rows_per_split,
                  num_warps=8 if block_r * block_c >= 2048 else 4)


@contextlib.contextmanager
def overrides(**sizes: int) -> Iterator[None]:
    """Force ``block_r``, ``block_c`` (powers of two) or ``splits`` inside this block.

    Tests use it to cut small tensors into many partial tiles and splits, so that every combination path runs.
    """
    previous = dict(_overrides)
    _overrides.update(sizes)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(previous)


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _target_programs(device: torch.device) -> int:
    """Programs enough to keep the device's memory system busy: four per SM on CUDA; few in the interpreter."""
    if device.type != "cuda":
        return 4
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
