"""Every rule of task-delta.md: valid files parse; each broken rule is refused naming its key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save

from adapters_store.format import BackboneMismatch, InvalidDelta, parse_delta
from adapters_store.packing import pack_bits, unpack_bits
from tests.factories import ALL_PARTS, make_delta

Q = "encoder.layer.0.attention.self.query"  # [32, 32] on the tiny BERT
FFN = "encoder.layer.1.intermediate.dense"  # [64, 32]
LN = "encoder.layer.0.output.LayerNorm"  # [32]


@pytest.fixture
def valid(tiny_backbone):
    delta = make_delta(tiny_backbone, ALL_PARTS, modules=[Q, FFN])
    return dict(delta.tensors()), delta.meta.to_metadata()


def _refused(backbone, tensors, metadata, key, error=InvalidDelta):
    with pytest.raises(error) as caught:
        parse_delta(save(tensors, metadata=metadata), backbone.spec())
    assert caught.value.key == key, str(caught.value)
    assert key in str(caught.value)
    return caught.value


def test_valid_delta_round_trips(tiny_backbone, valid):
    tensors, metadata = valid
    delta = parse_delta(save(tensors, metadata=metadata), tiny_backbone.spec())
    assert set(delta.tensors()) == set(tensors)
    again = parse_delta(delta.to_bytes(), tiny_backbone.spec())
    for key, tensor in delta.tensors().items():
        assert torch.equal(again.tensors()[key], tensor)
    assert delta.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert sum(delta.bytes_by_part().values()) == delta.nbytes


def test_half_precision_parts_are_accepted(tiny_backbone):
    for dtype in (torch.float16, torch.bfloat16):
        delta = make_delta(tiny_backbone, ALL_PARTS, dtype=dtype)
        assert parse_delta(delta.to_bytes(), tiny_backbone.spec()).head.classifier_weight.dtype == dtype


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("format", None),
        ("format", "task-delta/2"),
        ("method", None),
        ("method", "magic"),
        ("task_type", "translation"),
        ("labels", None),
        ("labels", "not json"),
        ("labels", "[]"),
        ("labels", '{"a": 1}'),
        ("labels", '["a", "a"]'),
        ("problem_type", "multi_label_soup"),
        ("max_length", "long"),
        ("max_length", "100000"),
        ("word_piece", "middle"),
        ("backbone_fingerprint", None),
    ],
)
def test_bad_metadata(tiny_backbone, valid, key, value):
    tensors, metadata = valid
    if value is None:
        metadata.pop(key)
    else:
        metadata[key] = value
    _refused(tiny_backbone, tensors, metadata, key)


def test_regression_needs_one_label(tiny_backbone, valid):
    tensors, metadata = valid
    metadata["problem_type"] = "regression"
    _refused(tiny_backbone, tensors, metadata, "problem_type")


def test_another_backbones_delta(tiny_backbone, valid):
    tensors, metadata = valid
    metadata["backbone_fingerprint"] = "sha256:" + "0" * 32
    _refused(tiny_backbone, tensors, metadata, "backbone_fingerprint", BackboneMismatch)


def test_not_a_safetensors_file(tiny_backbone):
    for data in (b"", b"hello world, not a delta", (10**12).to_bytes(8, "little") + b"{}"):
        with pytest.raises(InvalidDelta) as caught:
            parse_delta(data, tiny_backbone.spec())
        assert caught.value.key == "file"


def _mutations():
    f32 = torch.float32
    return [
        # (description, key to refuse, mutate(tensors))
        ("unknown key", "something.else", lambda t: t.update({"something.else": torch.zeros(1)})),
        ("unknown suffix", f"{Q}.scale", lambda t: t.update({f"{Q}.scale": torch.zeros(1)})),
        ("unknown module", "encoder.layer.9.attention.self.query.keep",
         lambda t: t.update({"encoder.layer.9.attention.self.query.keep": torch.zeros(128, dtype=torch.uint8)})),
        ("keep dtype", f"{Q}.keep", lambda t: t.update({f"{Q}.keep": t[f"{Q}.keep"].float()})),
        ("keep shape", f"{Q}.keep", lambda t: t.update({f"{Q}.keep": t[f"{Q}.keep"][:-1].clone()})),
        ("lora_B missing", f"{Q}.lora_B", lambda t: t.pop(f"{Q}.lora_B")),
        ("lora_A missing", f"{Q}.lora_A", lambda t: t.pop(f"{Q}.lora_A")),
        ("lora_A shape", f"{Q}.lora_A", lambda t: t.update({f"{Q}.lora_A": torch.zeros(4, 31)})),
        ("lora rank mismatch", f"{Q}.lora_B", lambda t: t.update({f"{Q}.lora_B": torch.zeros(32, 3)})),
        ("lora rank 0", f"{Q}.lora_A",
         lambda t: t.update({f"{Q}.lora_A": torch.zeros(0, 32), f"{Q}.lora_B": torch.zeros(32, 0)})),
        ("lora float64", f"{Q}.lora_A", lambda t: t.update({f"{Q}.lora_A": t[f"{Q}.lora_A"].double()})),
        ("lora NaN", f"{Q}.lora_B", lambda t: t[f"{Q}.lora_B"].__setitem__((0, 0), float("nan"))),
        ("lora inf", f"{Q}.lora_A", lambda t: t[f"{Q}.lora_A"].__setitem__((0, 0), float("inf"))),
        ("sparse value missing", f"{Q}.sparse_value", lambda t: t.pop(f"{Q}.sparse_value")),
        ("sparse index missing", f"{Q}.sparse_index", lambda t: t.pop(f"{Q}.sparse_index")),
        ("sparse index dtype", f"{Q}.sparse_index",
         lambda t: t.update({f"{Q}.sparse_index": t[f"{Q}.sparse_index"].int()})),
        ("sparse index out of range", f"{Q}.sparse_index",
         lambda t: t[f"{Q}.sparse_index"].__setitem__(0, 32 * 32)),
        ("sparse index negative", f"{Q}.sparse_index", lambda t: t[f"{Q}.sparse_index"].__setitem__(0, -1)),
        ("sparse index repeated", f"{Q}.sparse_index",
         lambda t: t[f"{Q}.sparse_index"].__setitem__(1, int(t[f"{Q}.sparse_index"][0]))),
        ("sparse length mismatch", f"{Q}.sparse_value",
         lambda t: t.update({f"{Q}.sparse_value": t[f"{Q}.sparse_value"][:-1].clone()})),
        ("sparse NaN", f"{Q}.sparse_value", lambda t: t[f"{Q}.sparse_value"].__setitem__(0, float("nan"))),
        ("bias delta shape", f"{Q}.bias_delta", lambda t: t.update({f"{Q}.bias_delta": torch.zeros(31)})),
        ("bias delta 2-D", f"{Q}.bias_delta", lambda t: t.update({f"{Q}.bias_delta": torch.zeros(1, 32)})),
        ("bias delta int", f"{Q}.bias_delta",
         lambda t: t.update({f"{Q}.bias_delta": torch.zeros(32, dtype=torch.int64)})),
        ("bias delta NaN", f"{Q}.bias_delta", lambda t: t[f"{Q}.bias_delta"].__setitem__(0, float("nan"))),
        ("bias delta too large", f"{Q}.bias_delta", lambda t: t[f"{Q}.bias_delta"].__setitem__(0, 1e6)),
        ("bias delta unknown module", "encoder.layer.9.output.dense.bias_delta",
         lambda t: t.update({"encoder.layer.9.output.dense.bias_delta": torch.zeros(32)})),
        ("norm delta width", f"{LN}.norm_weight_delta",
         lambda t: t.update({f"{LN}.norm_weight_delta": torch.zeros(31)})),
        ("norm delta NaN", f"{LN}.norm_bias_delta",
         lambda t: t.update({f"{LN}.norm_bias_delta": torch.full((32,), float("nan"))})),
        ("norm of a linear module", f"{Q}.norm_bias_delta",
         lambda t: t.update({f"{Q}.norm_bias_delta": torch.zeros(32)})),
        ("position shift width", "embeddings.position_delta",
         lambda t: t.update({"embeddings.position_delta": torch.zeros(4, 31)})),
        ("position shift too long", "embeddings.position_delta",
         lambda t: t.update({"embeddings.position_delta": torch.zeros(100_000, 32)})),
        ("token type shift rows", "embeddings.token_type_delta",
         lambda t: t.update({"embeddings.token_type_delta": torch.zeros(3, 32)})),
        ("head keep shape", "layers.0.head_keep",
         lambda t: t.update({"layers.0.head_keep": torch.ones(3, dtype=torch.uint8)})),
        ("head keep value", "layers.0.head_keep",
         lambda t: t.update({"layers.0.head_keep": torch.tensor([1, 2, 1, 1], dtype=torch.uint8)})),
        ("head keep dtype", "layers.0.head_keep", lambda t: t.update({"layers.0.head_keep": torch.ones(4)})),
        ("head keep layer", "layers.7.head_keep",
         lambda t: t.update({"layers.7.head_keep": torch.ones(4, dtype=torch.uint8)})),
        ("pasta layers", "pasta.vectors", lambda t: t.update({"pasta.vectors": torch.zeros(2, 3, 32)})),
        ("pasta width", "pasta.vectors", lambda t: t.update({"pasta.vectors": torch.zeros(3, 3, 31)})),
        ("pasta no slot", "pasta.vectors", lambda t: t.update({"pasta.vectors": torch.zeros(3, 0, 32)})),
        ("pasta 2-D", "pasta.vectors", lambda t: t.update({"pasta.vectors": torch.zeros(3, 32)})),
        ("pasta inf", "pasta.vectors", lambda t: t["pasta.vectors"].__setitem__((0, 0, 0), float("-inf"))),
        ("classifier missing", "head.classifier.weight", lambda t: t.pop("head.classifier.weight")),
        ("classifier bias missing", "head.classifier.bias", lambda t: t.pop("head.classifier.bias")),
        ("classes vs labels", "head.classifier.weight",
         lambda t: t.update({"head.classifier.weight": torch.zeros(3, 32), "head.classifier.bias": torch.zeros(3)})),
        ("classifier width", "head.classifier.weight",
         lambda t: t.update({"head.classifier.weight": torch.zeros(2, 16)})),
        ("classifier bias shape", "head.classifier.bias", lambda t: t.update({"head.classifier.bias": torch.zeros(3)})),
        ("classifier int", "head.classifier.weight",
         lambda t: t.update({"head.classifier.weight": torch.zeros(2, 32, dtype=torch.int32)})),
        ("classifier NaN", "head.classifier.weight",
         lambda t: t["head.classifier.weight"].__setitem__((0, 0), float("nan"))),
        ("pooler half", "head.pooler.bias", lambda t: t.pop("head.pooler.bias")),
        ("pooler shape", "head.pooler.weight",
         lambda t: t.update({"head.pooler.weight": torch.zeros(32, 16, dtype=f32)})),
    ]


@pytest.mark.parametrize(("what", "key", "mutate"), _mutations(), ids=[m[0] for m in _mutations()])
def test_bad_tensors(tiny_backbone, valid, what, key, mutate):
    tensors, metadata = valid
    tensors = {k: v.clone() for k, v in tensors.items()}
    mutate(tensors)
    _refused(tiny_backbone, tensors, metadata, key)


def test_pad_bits_must_be_zero(tokenizer):
    from tests.conftest import make_tiny_backbone

    backbone = make_tiny_backbone(tokenizer)
    spec = backbone.spec()
    odd = dict(spec.linear_modules)
    odd["encoder.layer.0.attention.self.query"] = (3, 3)  # 9 bits: 7 pad bits in the 2nd byte
    from dataclasses import replace

    spec = replace(spec, linear_modules=odd)
    delta = make_delta(backbone, ())
    tensors, metadata = dict(delta.tensors()), delta.meta.to_metadata()
    tensors[f"{Q}.keep"] = torch.tensor([255, 0b10000000], dtype=torch.uint8)
    assert parse_delta(save(tensors, metadata=metadata), spec).keep[Q].shape == (3, 3)
    tensors[f"{Q}.keep"] = torch.tensor([255, 0b10000001], dtype=torch.uint8)
    with pytest.raises(InvalidDelta, match="pad bits"):
        parse_delta(save(tensors, metadata=metadata), spec)


def test_head_pooler_only_for_sequence_classification(tiny_backbone):
    delta = make_delta(tiny_backbone, ("pooler",), task_type="token-classification", labels=("O", "B-X"))
    with pytest.raises(InvalidDelta) as caught:
        parse_delta(delta.to_bytes(), tiny_backbone.spec())
    assert caught.value.key == "head.pooler.weight"


def test_extra_metadata_is_kept(tiny_backbone):
    delta = make_delta(tiny_backbone, ())
    metadata = delta.meta.to_metadata() | {"trainer": json.dumps({"lr": 0.1}), "description": "hi"}
    parsed = parse_delta(save(dict(delta.tensors()), metadata=metadata), tiny_backbone.spec())
    assert parsed.meta.extra["trainer"] == json.dumps({"lr": 0.1})
    assert parsed.meta.description == "hi"


# ------------------------------------------------------------------ bit packing


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (8, 8), (7, 13), (384, 1536)])
def test_pack_round_trip_and_numpy_byte_order(shape):
    rng = np.random.default_rng(0)
    mask = rng.random(shape) > 0.3
    packed = pack_bits(torch.from_numpy(mask))
    assert packed.dtype == torch.uint8
    assert packed.numel() == (mask.size + 7) // 8
    assert bytes(packed.numpy()) == bytes(np.packbits(mask.reshape(-1)))
    assert torch.equal(unpack_bits(packed, shape), torch.from_numpy(mask))


def test_bit_order_is_most_significant_first():
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 0] = True  # bit 0 -> 0b1000_0000 of byte 0
    mask[1, 7] = True  # bit 15 -> 0b0000_0001 of byte 1
    assert pack_bits(mask).tolist() == [0b10000000, 0b00000001]


def test_dense_weight_composes_the_registered_parts_in_formula_order(tiny_backbone):
    """Each part's `dense_effect`, composed by `TaskDelta.dense_weight`, is W ⊙ K + B·A + S."""
    delta = make_delta(tiny_backbone, ("keep", "low_rank", "sparse"), seed=3, zero_fraction=0.3)
    module = sorted(set(delta.keep) & set(delta.low_rank) & set(delta.sparse))[0]
    weight = torch.randn(tiny_backbone.linear_modules[module])
    keep, low_rank, sparse = delta.keep[module], delta.low_rank[module], delta.sparse[module]
    expected = weight * unpack_bits(keep.packed, keep.shape).float() + low_rank.B @ low_rank.A
    expected.view(-1)[sparse.index] += sparse.value
    torch.testing.assert_close(delta.dense_weight(module, weight), expected)


def test_bias_delta_is_optional_and_adds_to_the_bias(tiny_backbone, valid):
    """A file without bias deltas parses as before; with one, `dense_bias` is b + δb and W is untouched."""
    tensors, metadata = valid
    without = {k: v for k, v in tensors.items() if not k.endswith(".bias_delta")}
    assert not parse_delta(save(without, metadata=metadata), tiny_backbone.spec()).bias
    delta = parse_delta(save(tensors, metadata=metadata), tiny_backbone.spec())
    assert set(delta.bias) == {Q, FFN}
    linear = tiny_backbone.model.get_submodule(Q)
    assert torch.equal(delta.dense_bias(Q, linear.bias), linear.bias + tensors[f"{Q}.bias_delta"])
    weight = linear.weight.detach()
    assert torch.equal(delta.bias[Q].dense_effect(weight), weight)
    assert delta.bytes_by_part()["BiasDelta"] == (32 + 64) * 4


def test_norm_deltas_and_embedding_shift_round_trip(tiny_backbone, valid):
    tensors, metadata = valid
    assert "embeddings.position_delta" in tensors and any(k.endswith(".norm_weight_delta") for k in tensors)
    delta = parse_delta(save(tensors, metadata=metadata), tiny_backbone.spec())
    assert delta.embedding_shift is not None and delta.norms
    assert set(delta.tensors()) == set(tensors)
    assert delta.bytes_by_part()["EmbeddingShift"] == (5 + 2) * 32 * 4
