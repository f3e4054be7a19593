"""StreamSpeech's chunk-based Conformer baseline: chunk-causal convs, relative positions, chunk
property (completed chunks never change when input is appended), lengths, padding, size."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from echostream.contract import conformer_block_chunks, conformer_conv_chunk
from echostream.config import get_preset
from echostream.models.conformer_encoder import (
    ChunkCausalConv1d,
    ChunkConformerEncoder,
    chunk_attention_mask,
    rel_shift,
    relative_position_encoding,
    subsampled_length,
)

ATOL = 1e-5


def tiny_conformer_cfg(**overrides):
    enc = get_preset("tiny").encoder
    return dataclasses.replace(enc, kind="conformer", subsampling="conv1d", subsampling_channels=16,
                               **overrides)


def make_encoder(cfg, seed: int = 0) -> ChunkConformerEncoder:
    """Seeded encoder in eval mode with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    enc = ChunkConformerEncoder(cfg).eval()
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return enc


def features(batch: int, frames: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, 80, generator=g)


def naive_chunk_conv(conv: torch.nn.Conv1d, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per output frame: gather the kernel's input frames, zero where outside [0, L) or past the
    end of the chunk that holds the frame's centre (the definition, written as a loop)."""
    B, C_in, L = x.shape
    k, s, pad = conv.kernel_size[0], conv.stride[0], conv.kernel_size[0] // 2
    outs = []
    for o in range((L - 1) // s + 1):
        centre = o * s
        chunk_end = (centre // chunk + 1) * chunk
        cols = []
        for t in range(centre - pad, centre - pad + k):
            inside = 0 <= t < L and t < chunk_end
            cols.append(x[:, :, t] if inside else torch.zeros(B, C_in))
        window = torch.stack(cols, dim=-1)  # [B, C_in, k]
        outs.append(F.conv1d(window, conv.weight, conv.bias, groups=conv.groups))
    return torch.cat(outs, dim=-1)


@pytest.mark.parametrize("kernel,stride,groups,chunk,length", [
    (5, 2, 1, 8, 37),    # subsampler convs (kernel 5, stride 2), c = 8
    (5, 2, 1, 16, 70),   # c = 16 (C >= 16)
    (5, 1, 1, 8, 13),
    (31, 1, 6, 8, 50),   # depthwise kernel 31: P = 15 > c, the context reaches back two chunks
    (31, 1, 6, 16, 41),
    (7, 1, 6, 8, 30),    # the tiny depthwise kernel
    (7, 2, 1, 8, 21),
])
def test_chunk_causal_conv_matches_definition(kernel, stride, groups, chunk, length):
    torch.manual_seed(0)
    conv = ChunkCausalConv1d(6, 12 if groups == 1 else 6, kernel, stride=stride, groups=groups)
    x = torch.randn(2, 6, length)
    got = conv(x, chunk)
    assert got.shape == (2, conv.out_channels, (length - 1) // stride + 1)
    want = naive_chunk_conv(conv, x, chunk)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # The streaming face: the last whole chunks, with the P frames before them as context.
    P, n = kernel // 2, min(2, length // chunk) * chunk
    start = (length // chunk) * chunk - n
    context = F.pad(x, (P, 0))[..., start:start + P]  # frames start-P .. start-1 (zeros before 0)
    piece = conv.step(context, x[..., start:start + n], chunk)
    torch.testing.assert_close(piece, want[..., start // stride:(start + n) // stride],
                               atol=ATOL, rtol=0)


def test_chunk_causal_conv_full_context_is_plain_conv():
    torch.manual_seed(0)
    conv = ChunkCausalConv1d(4, 8, 7, stride=2)
    x = torch.randn(1, 4, 19)
    ref = F.conv1d(x, conv.weight, conv.bias, stride=2, padding=3)
    torch.testing.assert_close(conv(x, None), ref, atol=ATOL, rtol=0)


def test_chunk_causal_conv_rejects_bad_chunk_and_kernel():
    conv = ChunkCausalConv1d(2, 2, 5, stride=2)
    with pytest.raises(ValueError, match="multiple of stride 2"):
        conv(torch.zeros(1, 2, 10), 3)
    with pytest.raises(ValueError, match="odd"):
        ChunkCausalConv1d(2, 2, 4)


def test_relative_positions_and_shift():
    T, d = 6, 8
    pe = relative_position_encoding(T, d)
    assert pe.shape == (2 * T - 1, d)
    # ESPnet builds it from flipped positive positions then negative ones; rebuild that way.
    pos = torch.arange(T, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(torch.log(torch.tensor(1e4)) / d))
    plus, minus = torch.zeros(T, d), torch.zeros(T, d)
    plus[:, 0::2], plus[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    minus[:, 0::2], minus[:, 1::2] = torch.sin(-pos * div), torch.cos(-pos * div)
    torch.testing.assert_close(pe, torch.cat([plus.flip(0), minus[1:]]), atol=1e-6, rtol=0)

    scores = torch.randn(2, 3, T, 2 * T - 1)
    shifted = rel_shift(scores)
    for i in range(T):
        for j in range(T):  # relative position i - j sits at column T-1-(i-j)
            assert torch.equal(shifted[..., i, j], scores[..., i, T - 1 - i + j])


def test_chunk_attention_mask_pattern():
    m = chunk_attention_mask(7, 3)
    expected = torch.tensor([[j < (i // 3 + 1) * 3 for j in range(7)] for i in range(7)])
    assert torch.equal(m, expected)
    assert chunk_attention_mask(5, None).all()


def test_lengths_and_padding_mask():
    enc = make_encoder(tiny_conformer_cfg())
    x = features(3, 57)
    lengths = torch.tensor([57, 40, 9])
    out = enc(x, lengths)
    want = ((lengths - 1) // 2) // 2 + 1  # floor((L-1)/2)+1 twice
    assert torch.equal(out["encoder_lengths"][0], want)
    assert torch.equal(subsampled_length(lengths), want)
    T = subsampled_length(57)
    assert out["encoder_out"][0].shape == (T, 3, 32)
    mask = out["encoder_padding_mask"][0]
    assert mask.dtype == torch.bool and mask.shape == (3, T)
    assert torch.equal(mask, torch.arange(T).unsqueeze(0) >= want.unsqueeze(1))


def test_padded_batch_equals_each_alone():
    enc = make_encoder(tiny_conformer_cfg())
    x = features(3, 61)
    lengths = torch.tensor([61, 45, 23])
    batched = enc(x, lengths)["encoder_out"][0]
    for b, n in enumerate(lengths.tolist()):
        alone = enc(x[b:b + 1, :n], torch.tensor([n]))["encoder_out"][0][:, 0]
        torch.testing.assert_close(batched[: alone.shape[0], b], alone, atol=ATOL, rtol=0)


# ---- StreamSpeech's conv rule (fidelity row a) ---------------------------------------------------


@pytest.mark.parametrize("chunk,conv_chunk,blocks", [(4, 8, 2), (8, 8, 1), (12, 8, 2), (15, 8, None),
                                                     (16, 16, 1), (24, 16, 2), (32, 16, 1),
                                                     (20, 16, None), (2, 8, None)])
def test_conv_chunk_rule(chunk, conv_chunk, blocks):
    """The agent's rule (16 if C >= 16 else 8) and the block a streaming step must hold."""
    assert conformer_conv_chunk(chunk) == conv_chunk
    if blocks is None:
        with pytest.raises(ValueError, match=f"chunk_size {chunk} cannot stream"):
            conformer_block_chunks(chunk)
    else:
        assert conformer_block_chunks(chunk) == blocks


@pytest.mark.parametrize("chunk", [4, 8, 16, 24, None])
def test_every_conv_uses_the_agents_conv_chunk(chunk, monkeypatch):
    """Both subsampler convs and every depthwise conv get conv_chunk(C) (in their own input
    frames), not 4C / 2C / C; the offline model (None) gets plain convs."""
    seen = []
    original = ChunkCausalConv1d.forward

    def spy(self, x, chunk_size=None):
        seen.append(chunk_size)
        return original(self, x, chunk_size)

    monkeypatch.setattr(ChunkCausalConv1d, "forward", spy)
    enc = make_encoder(tiny_conformer_cfg(num_layers=3))
    enc(features(1, 70), torch.tensor([70]), chunk_size=chunk)
    want = None if chunk is None else conformer_conv_chunk(chunk)
    assert seen == [want] * (2 + 3)


def test_subsampler_matches_definition():
    """The subsampler with c = 8: mask, conv-from-the-definition, GLU, twice (lengths 70 and 45)."""
    enc = make_encoder(tiny_conformer_cfg())
    x, lengths = features(2, 70), torch.tensor([70, 45])
    got, got_lengths = enc.subsample(x, lengths, 8)
    h, n = x.transpose(1, 2), lengths
    for conv in enc.subsample.conv_layers:
        h = h * (torch.arange(h.shape[-1]) < n.unsqueeze(1)).unsqueeze(1)
        h = F.glu(naive_chunk_conv(conv, h, 8), dim=1)
        n = (n - 1) // 2 + 1
    h = h * (torch.arange(h.shape[-1]) < n.unsqueeze(1)).unsqueeze(1)
    assert torch.equal(got_lengths, n)
    torch.testing.assert_close(got, h.transpose(1, 2), atol=ATOL, rtol=0)


def _completed_frames(fbank_frames: int, span: int) -> int:
    """Encoder frames of the spans of ``span`` encoder frames complete after ``fbank_frames``."""
    return (fbank_frames // (4 * span)) * span


@pytest.mark.parametrize("chunk", [8, 16])
def test_completed_chunks_do_not_change_when_input_grows(chunk):
    """c divides C: every conv chunk ends on an attention-chunk end, so appended audio never
    changes a completed chunk; the unfinished chunk is recomputed."""
    enc = make_encoder(tiny_conformer_cfg(chunk_size=chunk))
    x = features(1, 8 * 4 * chunk)
    full = enc.encode_prefix(x[0])["encoder_out"][0][:, 0]  # [T, D]
    changed_partial = False
    for prefix in (4 * chunk, 4 * chunk + 37, 8 * chunk, 17 * chunk + 5, 30 * chunk - 1):
        part = enc.encode_prefix(x[0, :prefix])["encoder_out"][0][:, 0]
        done = _completed_frames(prefix, chunk)
        assert done > 0
        torch.testing.assert_close(part[:done], full[:done], atol=ATOL, rtol=0)
        if part.shape[0] > done:
            changed_partial |= not torch.allclose(part[done:], full[done: part.shape[0]], atol=1e-3)
    # The frames of the unfinished chunk are recomputed with more input: they must differ somewhere.
    assert changed_partial


@pytest.mark.parametrize("chunk", [24, 4])
def test_with_two_chunks_per_block_only_blocks_are_final(chunk):
    """C = 24 (c = 16) or C = 4 (c = 8): a depthwise conv chunk straddles two attention chunks, so
    StreamSpeech's own output for the first chunk of a block changes when the next chunk arrives;
    completed blocks (2C frames) never change."""
    enc = make_encoder(tiny_conformer_cfg(chunk_size=chunk))
    x = features(1, 6 * 4 * chunk)
    full = enc.encode_prefix(x[0])["encoder_out"][0][:, 0]
    for blocks in (1, 2):
        done = 2 * chunk * blocks
        one_more_chunk = enc.encode_prefix(x[0, :4 * (done + chunk)])["encoder_out"][0][:, 0]
        torch.testing.assert_close(one_more_chunk[:done], full[:done], atol=ATOL, rtol=0)
        provisional = one_more_chunk[done:done + chunk] - full[done:done + chunk]
        assert provisional.abs().max() > 1e-2, "the block's first chunk should still change"


def test_full_context_is_not_prefix_invariant():
    """Control: with chunking off (the offline model) appended input changes earlier frames,
    so the chunk test above is able to fail."""
    enc = make_encoder(tiny_conformer_cfg())
    x = features(1, 64)
    full = enc.encode_prefix(x[0], chunk_size=None)["encoder_out"][0]
    part = enc.encode_prefix(x[0, :32], chunk_size=None)["encoder_out"][0]
    assert not torch.allclose(part[:4], full[:4], atol=1e-3)


def test_streamspeech_size_and_chunk_property():
    """The released dims: 33,450,752 parameters (streamspeech-facts.md §9: 33.45 M, subsampler
    1.72 M, 12 x 2.64 M layers), and the chunk property at C = 8 (320 ms)."""
    cfg = get_preset("streamspeech").encoder
    enc = make_encoder(cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(enc.subsample) == 80 * 1024 * 5 + 1024 + 512 * 512 * 5 + 512 == 1_721_856
    assert count(enc.conformer_layers[0]) == 2_638_592
    assert count(enc) == 33_450_752
    x = features(1, 200)
    full = enc.encode_prefix(x[0])["encoder_out"][0]
    part = enc.encode_prefix(x[0, :100])["encoder_out"][0]
    assert full.shape == (50, 1, 256) and part.shape == (25, 1, 256)
    torch.testing.assert_close(part[:24], full[:24], atol=1e-4, rtol=0)


def test_encode_prefix_equals_forward():
    enc = make_encoder(tiny_conformer_cfg())
    x = features(2, 33)
    a = enc.encode_prefix(x)
    b = enc(x, torch.tensor([33, 33]))
    assert torch.equal(a["encoder_out"][0], b["encoder_out"][0])
    assert not a["encoder_padding_mask"][0].any()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="kind 'conformer'"):
        ChunkConformerEncoder(get_preset("tiny").encoder)
    enc = make_encoder(tiny_conformer_cfg())
    with pytest.raises(ValueError, match=r"features expected \[B, F, 80\]"):
        enc(torch.zeros(1, 20, 40), torch.tensor([20]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, F=20\]"):
        enc(torch.zeros(2, 20, 80), torch.tensor([20, 21]))
    with pytest.raises(ValueError, match="integer"):
        enc(torch.zeros(1, 20, 80), torch.tensor([20.0]))
    with pytest.raises(ValueError, match="chunk_size"):
        enc(torch.zeros(1, 20, 80), torch.tensor([20]), chunk_size=0)


# ---- model size (models/param_count.py) ------------------------------------------------------


def test_streamspeech_total_matches_the_paper():
    """Released StreamSpeech dims: 70.6 M without the vocoder (streamspeech-facts.md §9), within 2 %."""
    pytest.importorskip("echostream.models.echostream_model", reason="EchoStreamModel not written yet")
    from echostream.models.param_count import build_for_counting, count_parameters

    counts = count_parameters(build_for_counting(get_preset("streamspeech")))
    assert abs(counts["total"] - 70.6e6) <= 0.02 * 70.6e6, counts
    assert counts["encoder"] == 33_450_752
    assert counts["asr_ctc"] == counts["st_ctc"] == 256 * 6000 + 6000
    assert counts["total"] == sum(v for k, v in counts.items() if k not in ("vocoder", "total"))


def test_count_parameters_ties_other_and_vocoder():
    from echostream.models.param_count import count_parameters

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Linear(4, 3)  # 15
            self.mt_decoder = torch.nn.Embedding(10, 3)  # 30
            self.unit_decoder = torch.nn.Linear(3, 10, bias=False)
            self.unit_decoder.weight = self.mt_decoder.weight  # tied: counted once in total
            self.vocoder = torch.nn.Linear(2, 2)  # 6, not in total
            self.extra = torch.nn.Parameter(torch.zeros(7))  # outside every stage
            self.register_buffer("stats", torch.zeros(100))  # buffers are not parameters

    counts = count_parameters(Toy())
    assert counts == {"encoder": 15, "mt_decoder": 30, "t2u+unit_decoder": 30, "vocoder": 6,
                      "other": 7, "total": 15 + 30 + 7}


def test_param_count_cli_markdown(capsys):
    from echostream.models.param_count import main

    pytest.importorskip("echostream.models.echostream_model", reason="EchoStreamModel not written yet")
    assert main(["--preset", "tiny", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("**preset tiny") and "| encoder |" in out and "| total |" in out
