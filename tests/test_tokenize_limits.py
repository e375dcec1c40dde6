"""Tokenisation costs linear time and memory, and refuses text that is not Unicode.

Regression for issue 8: `longest_first` pair truncation in the fast tokenizer built every
combination of the two sides' overflow windows (8,000 words a side: 3.9 GB; 50,000: OOM).
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pytest

from server.backbone import InvalidText

WORDS = ["the", "cat", "sat", "on", "a", "mat", "unbelievably", "antidisestablishmentarianism", "running",
         "12345", "über", "café", "東京", "😀"]


def test_cut_pairs_tokenise_exactly_as_plain_pair_truncation(minilm):
    """Cutting each side first changes nothing the tokenizer would have kept (ids, offsets, words)."""
    rng = random.Random(8)
    for trial in range(60):
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 300)))
        b = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 300)))
        if trial % 3 == 0:
            a = a.replace(" ", "")  # long words, cut in the middle
        for limit in (16, 128):
            expected = minilm.tokenizer(a, b, truncation="longest_first", max_length=limit,
                                        return_offsets_mapping=True)
            got = minilm.encode([(a, b)], limit)[0]
            assert got.input_ids == expected["input_ids"], (trial, limit)
            assert got.offsets == [tuple(o) for o in expected["offset_mapping"]], (trial, limit)
            assert got.word_ids == expected.word_ids() and got.sequence_ids == expected.sequence_ids()


MEASURE = textwrap.dedent("""
    import resource, sys
    from server.backbone import Backbone
    bb = Backbone.load(device="cpu")
    bb.encode([("warm up", "the tokenizer")], 128)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    words = int(sys.argv[1])
    out = bb.encode([("word " * words, "other " * words)], 128)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(len(out[0].input_ids), (after - before) // 1024)
""")


def test_a_huge_pair_costs_bounded_tokens_and_memory():
    """10,000 words a side (quadratic before: ~6 GB) stays within 128 tokens and a few MB of peak memory."""
    result = subprocess.run([sys.executable, "-c", MEASURE, "10000"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    tokens, grown_mb = map(int, result.stdout.split())
    assert tokens == 128
    assert grown_mb < 150, f"peak RSS grew {grown_mb} MB for one pair"


@pytest.mark.parametrize("item", ["a\ud800b", ("fine", "\udfff"), ("\ud83d", "fine")])
def test_lone_surrogates_are_invalid_text(minilm, item):
    with pytest.raises(InvalidText, match="surrogate"):
        minilm.encode([item], 32)
