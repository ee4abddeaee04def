"""Philox4x32-10: one definition, checked against Random123's known answers and across backends."""

import pytest
import torch
import triton
import triton.language as tl

from crossspec_kernels import reference
from crossspec_kernels.triton.verify import _philox_uniform, _race_uniforms

PHILOX_KAT = [  # Random123 tests/kat_vectors, "philox4x32 10": counter, key, expected
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_reference_philox_known_answers(counter, key, expected):
    assert tuple(int(w) for w in reference.philox4x32_10(counter, key)) == expected


def test_reference_philox_vectorises():
    counters = torch.tensor(
        [
            [0, 0xFFFFFFFF, 0x243F6A88],
            [0, 0xFFFFFFFF, 0x85A308D3],
            [0, 0xFFFFFFFF, 0x13198A2E],
            [0, 0xFFFFFFFF, 0x03707344],
        ]
    )
    keys = torch.tensor([[0, 0xFFFFFFFF, 0xA4093822], [0, 0xFFFFFFFF, 0x299F31D0]])
    words = reference.philox4x32_10(tuple(counters), tuple(keys))
    for i, (_, _, expected) in enumerate(PHILOX_KAT):
        assert tuple(int(w[i]) for w in words) == expected


def test_uniform_is_exact_and_strictly_inside_the_unit_interval():
    words = torch.tensor([0, 511, 512, 0xFFFFFDFF, 0xFFFFFFFF])
    uniforms = reference.uniform_from_word(words)
    assert uniforms.dtype == torch.float32
    assert uniforms.tolist() == [2.0**-24, 2.0**-24, 3 * 2.0**-24, 1 - 3 * 2.0**-24, 1 - 2.0**-24]
    exponentials = -torch.log(uniforms)
    assert bool(torch.isfinite(exponentials).all()) and bool((exponentials > 0).all())


@triton.jit
def _uniforms_kernel(out_ptr, seed, offset, row, slot, BLOCK: tl.constexpr):
    tokens = tl.arange(0, BLOCK)
    # The verify kernel loads seed/offset from int64 tensors; scalars may arrive as int32.
    uniforms = _philox_uniform(
        seed.to(tl.int64), offset.to(tl.int64), row.to(tl.int64), slot, tokens.to(tl.uint32)
    )
    tl.store(out_ptr + tokens, uniforms)


@pytest.mark.parametrize(
    "seed,offset,row,slot", [(0, 0, 0, 0), (-1, 2**40 + 3, 65534, 65535), (2**62 + 7, -5, 17, 3)]
)
def test_triton_philox_matches_reference(seed, offset, row, slot):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(64, device=device)
    _uniforms_kernel[(1,)](out, seed, offset, row, slot, BLOCK=64)
    expected = reference.philox_uniform(seed, offset, row, slot, torch.arange(64))
    assert torch.equal(out.cpu(), expected)
    assert ((expected > 0) & (expected < 1)).all()
    assert len(set(expected.tolist())) == 64  # distinct tokens get distinct noise


@triton.jit
def _race_uniforms_kernel(out_ptr, seed, offset, row, slot, start, BLOCK: tl.constexpr):
    uniforms = _race_uniforms(seed.to(tl.int64), offset.to(tl.int64), row.to(tl.int64), slot, start, BLOCK)
    tl.store(out_ptr + tl.arange(0, BLOCK), uniforms)


@pytest.mark.parametrize("start", [0, 64, 2**20])
def test_triton_race_tiles_match_reference(start):
    """The vocabulary-tile path (one Philox call per 4 tokens) gives every token its own uniform."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(64, device=device)
    _race_uniforms_kernel[(1,)](out, 9, 2**33, 300, 12, start, BLOCK=64)
    assert torch.equal(out.cpu(), reference.philox_uniform(9, 2**33, 300, 12, start + torch.arange(64)))


def test_vocab_uniforms_match_per_token_definition():
    seed, offset = torch.tensor([3, -7]), torch.tensor([0, 2**35])
    row, slot = torch.tensor([0, 40000]), torch.tensor([5, 65535])
    for vocab in (1, 6, 1001):
        tiles = reference.vocab_uniforms(seed, offset, row, slot, vocab)
        per_token = reference.philox_uniform(
            seed[:, None], offset[:, None], row[:, None], slot[:, None], torch.arange(vocab)
        )
        assert tiles.shape == (2, vocab) and torch.equal(tiles, per_token)
