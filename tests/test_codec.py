"""The lossless byte-plane code (issue 17): every byte comes back as it went in, from any 512-byte boundary on."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_map.runtime import codec
from offload_map.runtime.codec import decode, encode


def _bytes(values: torch.Tensor) -> torch.Tensor:
    return values.contiguous().view(torch.uint8)


def _decoded_from_a_copy(part: codec.Coded) -> torch.Tensor:
    # As a load does: the part's planes copied into a staging buffer (filled with garbage first), decoded from there.
    copy = part.like(torch.full((codec.footprint(part),), 9, dtype=torch.uint8))
    for into, plane in zip(copy.planes, part.planes):
        into.copy_(plane)
    return decode(copy)


def _round_trips(raw: torch.Tensor) -> codec.Coded:
    coded = encode(raw)
    assert torch.equal(decode(coded), raw)
    return coded


def test_every_16_bit_pattern_round_trips():
    # 256 high bytes, equally common: a 1-bit code is the cheapest, and all but one high byte escape.
    coded = _round_trips(_bytes(torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)))
    assert coded.bits == 1 and coded.escapes.numel() == 2**16 - 256


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_special_values_round_trip(dtype):
    info = torch.finfo(dtype)
    values = torch.tensor(
        [0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, info.max, -info.max, float("inf"), float("-inf"), float("nan")],
        dtype=dtype,
    )
    nans = torch.tensor([0x7FC1, 0x7F81, -0x003F, -0x7E], dtype=torch.int16)  # other payloads and signs
    _round_trips(torch.cat([_bytes(values), _bytes(nans)]))


def test_odd_word_counts_and_empty_round_trip():
    for n in (0, 1, 2, 3, 17):
        _round_trips(_bytes(torch.randn(n).bfloat16()))


def test_the_seven_most_common_high_bytes_take_codes_and_the_rest_escape_in_word_order(monkeypatch):
    monkeypatch.setattr(codec, "SAMPLE", 1)  # the table from every word: which high bytes are common is exact
    common = torch.tensor([0x3C, 0xBC, 0x3D, 0xBD, 0x3E, 0xBE, 0x00], dtype=torch.uint8).repeat(4000)
    rare = torch.tensor([0x7F, 0x80, 0xFF, 0x3C], dtype=torch.uint8)  # inf or NaN, -0.0, and one common again
    high = torch.cat([common[:9000], rare, common[9000:]])
    coded = _round_trips(torch.stack([torch.arange(high.numel()).to(torch.uint8), high], dim=1).flatten())
    assert coded.bits == 3 and sorted(coded.table[:7].tolist()) == sorted(common[:7].tolist())
    assert coded.escapes.tolist() == [0x7F, 0x80, 0xFF]


@pytest.mark.parametrize("kinds, bits", [(1, 1), (2, 2), (3, 2), (6, 3), (7, 3), (15, 4)])
def test_the_code_is_as_wide_as_the_fewest_bytes_need(kinds, bits):
    # ``kinds`` high bytes, about equally common: 2**bits - 1 codes hold them all at the fewest bytes.
    high = torch.randint(0, kinds, (1 << 16,), generator=torch.Generator().manual_seed(kinds)).to(torch.uint8)
    coded = _round_trips(torch.stack([torch.zeros_like(high), high], dim=1).flatten())
    assert coded.bits == bits, coded.ratio


def test_trained_like_weights_stream_in_three_quarters_of_the_bytes():
    w = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1)).mul(0.02).bfloat16()
    coded = _round_trips(_bytes(w))
    assert coded.bits == 3 and coded.ratio <= 0.715


def test_fp16_keeps_the_high_bytes_mantissa_bits_raw_and_codes_the_rest():
    w = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1)).mul(0.02).half()
    coded = _round_trips(_bytes(w))
    assert (coded.bits, coded.raw_bits) == (4, 2) and coded.ratio <= 0.89


def test_fp32_does_not_compress_and_says_so():
    coded = _round_trips(_bytes(torch.randn(1 << 16)))
    assert coded.ratio > 1.0


@pytest.mark.parametrize("start, stop", [(0, 16384), (512, 16384), (0, 1024), (1024, 8192), (8192, 16384), (16384, 16384)])
@pytest.mark.parametrize("group", [8, 64, 512, 4096])  # groups within a 512-byte run, across runs, and the default
def test_a_part_between_512_byte_boundaries_decodes_alone_from_a_copy_of_its_planes(start, stop, group, monkeypatch):
    monkeypatch.setattr(codec, "GROUP", group)
    w = torch.randn(8192, generator=torch.Generator().manual_seed(2)).bfloat16()
    w[::97] = float("inf")  # escapes spread over the whole run
    raw = _bytes(w)
    part = encode(raw).part(start, stop)
    assert torch.equal(_decoded_from_a_copy(part), raw[start:stop])


def test_a_part_ending_with_an_odd_word_count_run_decodes():
    raw = _bytes(torch.randn(259).bfloat16())
    assert torch.equal(decode(encode(raw).part(512, 518)), raw[512:])


def test_a_part_off_a_boundary_or_outside_the_run_is_refused():
    coded = encode(_bytes(torch.randn(1024).bfloat16()))
    with pytest.raises(ValueError, match="512-byte boundary, not at byte 100"):
        coded.part(100, 2048)
    with pytest.raises(ValueError, match="bytes 1024:2560 are not a range within the run's 2048 bytes"):
        coded.part(1024, 2560)


def test_zeros_when_common_take_a_code_of_their_own():
    w = torch.randn(1 << 16).mul(0.02).bfloat16()
    w[: 1 << 15] = 0.0  # zero-initialised biases
    coded = _round_trips(_bytes(w))
    assert 0 in coded.table[: 2**coded.bits - 1].tolist() and coded.ratio < 0.72


def test_decode_writes_into_out_in_chunks(monkeypatch):
    monkeypatch.setattr(codec, "CHUNK", 2)  # several chunks of groups, the last one short
    monkeypatch.setattr(codec, "GROUP", 8)
    raw = _bytes(torch.randn(33).bfloat16())
    out = torch.full((70,), 7, dtype=torch.uint8)
    assert decode(encode(raw), out=out) is out
    assert torch.equal(out[:66], raw) and (out[66:] == 7).all()


def test_input_that_is_not_whole_words_is_refused():
    with pytest.raises(ValueError, match="1-D uint8 tensor of whole 16-bit words"):
        encode(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1-D uint8 tensor"):
        encode(torch.zeros(4, dtype=torch.int16))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400).filter(lambda b: len(b) % 2 == 0))
def test_any_bytes_round_trip(data):
    _round_trips(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(width=16, allow_nan=True, allow_infinity=True), max_size=200), st.floats(1e-6, 1e3))
def test_scaled_half_values_round_trip(values, scale):
    t = torch.tensor(values, dtype=torch.float32).mul(scale)
    _round_trips(_bytes(t.to(torch.float16)))
    _round_trips(_bytes(t.to(torch.bfloat16)))


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 24).flatmap(lambda runs: st.binary(min_size=512 * runs, max_size=512 * runs)),
    st.sampled_from([8, 64, 256, 4096]),
    st.sampled_from([0xFF, 0x8F, 0x83, 0x03, 0x00]),  # high bytes masked: 256 to 1 symbols, kept bits or not
    st.data(),
)
def test_any_part_of_any_bytes_decodes_alone_for_any_group_size(data, group, mask, draw):
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    raw[1::2] &= mask
    saved, codec.GROUP = codec.GROUP, group  # not monkeypatch: hypothesis runs the examples inside one test call
    try:
        coded = encode(raw)
    finally:
        codec.GROUP = saved
    runs = raw.numel() // 512
    start = 512 * draw.draw(st.integers(0, runs))
    stop = 512 * draw.draw(st.integers(start // 512, runs))
    part = coded.part(start, stop)
    assert torch.equal(_decoded_from_a_copy(part), raw[start:stop])
