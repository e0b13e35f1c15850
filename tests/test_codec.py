"""The lossless 16-bit word code (issue 17): every bit pattern comes back as it went in."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_map.runtime.codec import ESCAPE, decode, encode


def _round_trips(words: torch.Tensor) -> None:
    coded = encode(words)
    assert torch.equal(decode(coded), words)


def test_every_16_bit_pattern_round_trips():
    # 256 distinct exponents: all but 15 go through the escape list.
    words = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    coded = encode(words)
    assert coded.escape_index.numel() > 0.9 * words.numel()
    assert torch.equal(decode(coded), words)


def test_special_values_of_both_dtypes_round_trip():
    for dtype in (torch.bfloat16, torch.float16):
        info = torch.finfo(dtype)
        values = torch.tensor(
            [0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, info.max, -info.max, float("inf"), float("-inf"), float("nan")],
            dtype=dtype,
        )
        words = values.view(torch.int16)
        # NaNs with other payloads and signs than the canonical one.
        words = torch.cat([words, torch.tensor([0x7FC1, 0x7F81, -0x003F, -0x7E], dtype=torch.int16)])
        _round_trips(words)


def test_odd_lengths_and_empty_round_trip():
    for n in (0, 1, 2, 3, 17):
        _round_trips(torch.randn(n).bfloat16().view(torch.int16))


def test_escapes_mark_the_exponents_outside_the_table():
    # 16 distinct exponents, the rarest one (a single word) must escape.
    exponents = torch.cat([torch.arange(15).repeat_interleave(4), torch.tensor([200])])
    words = (exponents << 7).to(torch.int16)
    coded = encode(words)
    assert coded.escape_index.tolist() == [60]
    assert coded.escape_exponent.tolist() == [200]
    assert (coded.table[:15].sort().values == torch.arange(15, dtype=torch.uint8)).all()
    assert ESCAPE == 15
    _round_trips(words)


def test_trained_like_weights_stream_in_three_quarters_of_the_bytes():
    w = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1)).mul(0.02).bfloat16().view(torch.int16)
    coded = encode(w)
    assert coded.nbytes <= 0.755 * 2 * w.numel()
    assert torch.equal(decode(coded), w)


def test_decode_writes_into_out():
    w = torch.randn(33).bfloat16().view(torch.int16)
    out = torch.empty_like(w)
    assert decode(encode(w), out=out) is out
    assert torch.equal(out, w)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(-(2**15), 2**15 - 1), max_size=200))
def test_any_words_round_trip(values):
    _round_trips(torch.tensor(values, dtype=torch.int16))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(width=16, allow_nan=True, allow_infinity=True), max_size=200),
    st.floats(1e-6, 1e3),
)
def test_scaled_fp16_values_round_trip(values, scale):
    t = torch.tensor(values, dtype=torch.float32).mul(scale).to(torch.float16)
    _round_trips(t.view(torch.int16))
