"""Conv2D subsampling: the length formula and windowed == full pass (DESIGN §5)."""
from __future__ import annotations

import pytest
import torch

from echostream.models.subsampling import Conv2dSubsampling, subsampled_length, window_frames


def make_subsampling(seed: int = 0) -> Conv2dSubsampling:
    torch.manual_seed(seed)
    return Conv2dSubsampling(input_dim=80, channels=8, d_model=16).eval()


@pytest.mark.parametrize("num_frames", [7, 8, 9, 10, 11, 20, 43, 100, 101, 102, 103])
def test_length_formula_matches_conv_output(num_frames):
    sub = make_subsampling()
    with torch.no_grad():
        out = sub(torch.randn(1, num_frames, 80))
    assert out.shape == (1, subsampled_length(num_frames), 16)
    assert subsampled_length(num_frames) == ((num_frames - 3) // 2 + 1 - 3) // 2 + 1


def test_length_formula_on_tensors_and_short_inputs():
    lengths = torch.tensor([0, 3, 6, 7, 10, 11, 43, 1000])
    got = subsampled_length(lengths)
    assert got.tolist() == [subsampled_length(int(n)) for n in lengths]
    assert got.tolist()[:4] == [0, 0, 0, 1]  # fewer than 7 frames -> no encoder frame
    # N encoder frames need exactly 4N+3 fbank frames.
    for n in range(1, 30):
        assert subsampled_length(window_frames(n)) == n
        assert subsampled_length(window_frames(n) - 1) == n - 1


@pytest.mark.parametrize("segment,right", [(4, 1), (8, 2), (3, 0)])
def test_windowed_equals_full_pass(segment, right):
    """Windows of 4(S+R)+3 frames advanced by 4S give exactly the full pass's frames."""
    sub = make_subsampling(1)
    steps = 6
    total = window_frames(steps * segment + right)
    features = torch.randn(2, total, 80)
    with torch.no_grad():
        full = sub(features)
        assert full.shape[1] == steps * segment + right
        for n in range(steps):
            start = 4 * segment * n
            window = sub(features[:, start:start + window_frames(segment + right)])
            expected = full[:, n * segment:n * segment + segment + right]
            assert window.shape == expected.shape
            assert (window - expected).abs().max().item() <= 1e-6


def test_bad_input_raises():
    sub = make_subsampling()
    with pytest.raises(ValueError, match=r"expected \[B, F, 80\], got \[1, 20, 40\]"):
        sub(torch.randn(1, 20, 40))
    with pytest.raises(ValueError, match="at least 7 frames"):
        sub(torch.randn(1, 6, 80))
    with pytest.raises(ValueError, match="input_dim"):
        Conv2dSubsampling(input_dim=5, channels=4, d_model=8)
