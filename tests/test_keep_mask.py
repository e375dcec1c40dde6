"""Both ways of building W ⊙ K are exact, and the smaller one to keep resident is chosen."""

from __future__ import annotations

import pytest
import torch

from adapters_store.format import KeepMask
from adapters_store.packing import pack_bits, unpack_bits
from server.parts.keep_mask import PreparedKeepMask


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (384, 1536), (7, 13)])
@pytest.mark.parametrize("zero_fraction", [0.0, 0.002, 0.05, 0.2, 0.9, 1.0])
def test_materialised_weight_is_exact(shape, zero_fraction):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen)
    keep = torch.rand(shape, generator=gen) >= zero_fraction
    part = KeepMask("m", shape, pack_bits(keep))
    prepared = PreparedKeepMask(part, torch.device("cpu"))
    out = torch.full_like(weight, float("nan"))  # a dirty scratch buffer must not leak through
    prepared.materialise_into(weight, out)
    assert torch.equal(out, weight * unpack_bits(part.packed, shape).float())
    assert prepared.nbytes <= part.nbytes
    assert prepared.zero_fraction == pytest.approx(1 - keep.double().mean().item())


def test_sparse_masks_keep_dropped_positions_dense_ones_keep_bits():
    shape = (1536, 384)
    gen = torch.Generator().manual_seed(1)
    few_zeros = PreparedKeepMask(KeepMask("m", shape, pack_bits(torch.rand(shape, generator=gen) >= 0.03)),
                                 torch.device("cpu"))
    many_zeros = PreparedKeepMask(KeepMask("m", shape, pack_bits(torch.rand(shape, generator=gen) >= 0.2)),
                                  torch.device("cpu"))
    assert few_zeros.packed is None and few_zeros.zero_columns is not None
    assert many_zeros.packed is not None and many_zeros.zero_columns is None
    assert few_zeros.nbytes < shape[0] * shape[1] / 8
