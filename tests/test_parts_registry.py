"""The parts registry is complete: every module part kind the format registers has a dense effect,
a prepared class for every engine backend, and a trainable class, so a new part cannot be half added."""

from __future__ import annotations

import pytest
import torch

from adapters_store.format import MODULE_PARTS, ModulePart
from server.parts import BACKENDS, HEAD_KEEP, prepared_class
from training.parts import TRAINABLE_PARTS, TrainablePart


@pytest.mark.parametrize("kind", list(MODULE_PARTS))
def test_every_module_part_is_registered_everywhere(kind):
    cls = MODULE_PARTS[kind]
    assert cls.dense_effect is not ModulePart.dense_effect, f"{kind}: no dense effect"
    for backend in BACKENDS:
        prepared = prepared_class(backend, kind)
        assert prepared.role in ("input", "replace", "correct", "output"), f"{backend}/{kind}: no role"
    trainable = TRAINABLE_PARTS[kind]
    for method in ("apply_to", "export", "frozen"):
        assert getattr(trainable, method) is not getattr(TrainablePart, method), f"{kind}: trainable lacks {method}"


def test_head_keep_is_prepared_for_every_backend():
    for backend in BACKENDS:
        assert prepared_class(backend, HEAD_KEEP).role == "input"


def test_no_trainable_part_without_a_format_part():
    assert set(TRAINABLE_PARTS) == set(MODULE_PARTS)


@pytest.mark.parametrize("kind", list(MODULE_PARTS))
def test_trainable_part_round_trips_through_the_format(kind):
    """frozen(part).export() gives the part back, and its effect on a weight is the format's dense effect."""
    from adapters_store.format import BiasDelta, KeepMask, LowRank, SparseUpdate
    from adapters_store.packing import pack_bits

    generator = torch.Generator().manual_seed(0)
    shape = (6, 5)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator)

    weight = rand(*shape)
    made = {
        KeepMask.kind: lambda: KeepMask("m", shape, pack_bits(torch.rand(shape, generator=generator) > 0.3)),
        LowRank.kind: lambda: LowRank("m", rand(2, 5), rand(6, 2)),
        SparseUpdate.kind: lambda: SparseUpdate("m", shape, torch.tensor([0, 7, 29]), rand(3)),
        BiasDelta.kind: lambda: BiasDelta("m", rand(6)),
    }
    if kind not in made:
        pytest.fail(f"{kind}: add an example part here")
    part = made[kind]()
    trainable = TRAINABLE_PARTS[kind].frozen(part, torch.device("cpu"))
    assert torch.equal(trainable.apply_to(weight), part.dense_effect(weight))
    bias = rand(shape[0])
    assert torch.equal(trainable.apply_to_bias(bias), getattr(part, "dense_bias", lambda b: b)(bias))
    again = trainable.export("m", shape)
    assert all(torch.equal(a, b) for a, b in zip(again.tensors().values(), part.tensors().values(), strict=True))
