"""Both ways of building W ⊙ K are exact, and the smaller one to keep resident is chosen."""

from __future__ import annotations

import pytest
import torch

from adapters_store.format import KeepMask
from adapters_store.packing import pack_bits, unpack_bits
from server.parts import PrepareContext
from server.parts.keep_mask import PreparedKeepMask

CPU = PrepareContext(torch.device("cpu"), torch.float32, head_dim=1)


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (384, 1536), (7, 13)])
@pytest.mark.parametrize("zero_fraction", [0.0, 0.002, 0.05, 0.2, 0.9, 1.0])
def test_materialised_weight_is_exact(shape, zero_fraction):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen)
    keep = torch.rand(shape, generator=gen) >= zero_fraction
    part = KeepMask("m", shape, pack_bits(keep))
    prepared = PreparedKeepMask(part, CPU)
    out = torch.full_like(weight, float("nan"))  # a dirty scratch buffer must not leak through
    prepared.materialise_into(weight, out)
    assert torch.equal(out, weight * unpack_bits(part.packed, shape).float())
    assert prepared.nbytes <= part.nbytes
    assert prepared.zero_fraction == pytest.approx(1 - keep.double().mean().item())


def test_sparse_masks_keep_dropped_positions_dense_ones_keep_bits():
    shape = (1536, 384)
    gen = torch.Generator().manual_seed(1)
    few_zeros = PreparedKeepMask(KeepMask("m", shape, pack_bits(torch.rand(shape, generator=gen) >= 0.03)),
                                 CPU)
    many_zeros = PreparedKeepMask(KeepMask("m", shape, pack_bits(torch.rand(shape, generator=gen) >= 0.2)),
                                  CPU)
    assert few_zeros.in_place and few_zeros.packed is None
    assert not many_zeros.in_place and many_zeros.zero_gaps is None
    assert few_zeros.nbytes < shape[0] * shape[1] / 8


@pytest.mark.parametrize("zero_fraction", [0.0, 0.01, 0.05])
def test_in_place_zeroing_is_exact_and_restores_the_weight_bit_for_bit(zero_fraction):
    shape = (384, 1536)
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(shape, generator=gen)
    pristine = weight.clone()
    keep = torch.rand(shape, generator=gen) >= zero_fraction
    prepared = PreparedKeepMask(KeepMask("m", shape, pack_bits(keep)), CPU)
    assert prepared.in_place
    with prepared.zeroed(weight) as masked:
        assert masked is weight
        assert torch.equal(weight, pristine * keep)
    assert torch.equal(weight, pristine)
    with pytest.raises(RuntimeError), prepared.zeroed(weight):
        raise RuntimeError("a failing GEMM")
    assert torch.equal(weight, pristine)


def test_long_runs_without_zeros_fall_back_to_bits():
    shape = (384, 1536)
    keep = torch.ones(shape, dtype=torch.bool)
    keep[0, 0] = keep[-1, -1] = False  # a gap of ~590k positions does not fit int16
    prepared = PreparedKeepMask(KeepMask("m", shape, pack_bits(keep)), CPU)
    assert not prepared.in_place
    weight = torch.randn(shape)
    assert torch.equal(prepared.materialise_into(weight, torch.empty_like(weight)), weight * keep)
