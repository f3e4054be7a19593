"""Conv2D subsampling as StreamSpeech's ``Conv2dSubsampler`` (padding 1 in time and frequency,
``Linear(C x 20 -> D)``): the length rule, a from-the-definition reference, and windowed == full
pass from the utterance start (DESIGN §5, fidelity row g)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from echostream.models.subsampling import (
    WINDOW_LEAD,
    Conv2dSubsampling,
    subsampled_length,
    window_frames,
)


def make_subsampling(seed: int = 0) -> Conv2dSubsampling:
    torch.manual_seed(seed)
    return Conv2dSubsampling(input_dim=80, channels=8, d_model=16).eval()


def definition(sub: Conv2dSubsampling, features: torch.Tensor) -> torch.Tensor:
    """fairseq's Conv2dSubsampler written out: pad 1 on every side of both convs."""
    x = features.unsqueeze(1)
    for conv in (sub.conv[0], sub.conv[2]):
        x = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1)), conv.weight, conv.bias, stride=2))
    b, c, t, f = x.shape
    return F.linear(x.transpose(1, 2).reshape(b, t, c * f), sub.out.weight, sub.out.bias)


def test_shapes_match_streamspeech_codebase():
    sub = Conv2dSubsampling(input_dim=80, channels=256, d_model=256)
    assert sub.freq_out == 20
    assert tuple(sub.out.weight.shape) == (256, 256 * 20)  # the 256 x 5120 of fidelity row g
    assert all(c.padding == (1, 1) for c in (sub.conv[0], sub.conv[2]))


@pytest.mark.parametrize("num_frames", [1, 2, 4, 5, 7, 8, 9, 20, 43, 100, 103])
def test_full_pass_matches_definition_and_length_rule(num_frames):
    sub = make_subsampling()
    features = torch.randn(2, num_frames, 80)
    with torch.no_grad():
        out, ref = sub(features), definition(sub, features)
    assert out.shape == (2, subsampled_length(num_frames), 16)
    assert subsampled_length(num_frames) == ((num_frames - 1) // 2 + 1 - 1) // 2 + 1
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_length_formula_on_tensors():
    lengths = torch.tensor([0, 1, 3, 4, 5, 7, 43, 1000])
    got = subsampled_length(lengths)
    assert got.tolist() == [subsampled_length(int(n)) for n in lengths]
    assert got.tolist()[:5] == [0, 1, 1, 1, 2]


@pytest.mark.parametrize("segment,right", [(4, 1), (8, 2), (3, 0)])
def test_windowed_equals_full_pass(segment, right):
    """Windows of 4(S+R)+3 frames starting 3 frames before each segment (zeros before the
    utterance), advanced by 4S, give exactly the full pass's frames, the first window included."""
    sub = make_subsampling(1)
    steps = 6
    frames = 4 * (steps * segment + right) + 8  # real frames past the last window: no edge effect
    features = torch.randn(2, frames, 80)
    padded = F.pad(features, (0, 0, WINDOW_LEAD, 0))  # zeros before the utterance
    with torch.no_grad():
        full = sub(features)
        for n in range(steps):
            start = 4 * segment * n  # in `padded`: fbank frame 4Sn - 3
            window = padded[:, start:start + window_frames(segment + right)]
            first = torch.tensor([n == 0, n == 0])
            got = sub.window(window, first)
            expected = full[:, n * segment:n * segment + segment + right]
            assert got.shape == expected.shape
            assert (got - expected).abs().max().item() <= 1e-6, n


def test_first_window_mask_matters():
    """Without zeroing the padding row the first window differs from the full pass: the mask is
    what makes the utterance start exact."""
    sub = make_subsampling(2)
    features = torch.randn(1, 64, 80)
    window = F.pad(features, (0, 0, WINDOW_LEAD, 0))[:, :window_frames(4)]
    with torch.no_grad():
        exact = sub.window(window, torch.tensor([True]))
        unmasked = sub.window(window, torch.tensor([False]))
        full = sub(features)[:, :4]
    assert (exact - full).abs().max() <= 1e-6
    assert (unmasked - full).abs().max() > 1e-3


def test_bad_input_raises():
    sub = make_subsampling()
    with pytest.raises(ValueError, match=r"expected \[B, F, 80\], got \[1, 20, 40\]"):
        sub(torch.randn(1, 20, 40))
    with pytest.raises(ValueError, match="at least 7 frames"):
        sub.window(torch.randn(1, 6, 80), torch.tensor([True]))
    with pytest.raises(ValueError, match="input_dim"):
        Conv2dSubsampling(input_dim=1, channels=4, d_model=8)
