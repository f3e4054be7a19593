"""Unit HiFi-GAN vocoder (fairseq ``CodeGenerator`` / CodeHiFiGAN) with its duration predictor.

Whole-sequence path (the reference, as fairseq's ``CodeGenerator.forward``):
    units [B, N] -> embedding [B, N, E] -> log-durations -> durations -> repeat per unit ->
    conv_pre -> (LeakyReLU 0.1 -> ConvTranspose1d -> MRF resblocks) x 5 -> LeakyReLU(0.01) ->
    conv_post -> tanh -> wav [B, T * hop]   (T = sum of durations, hop = 320 at 16 kHz).

Windowed stage paths (``duration_step``, ``vocoder_step``) take fixed-width int32 windows where -1
means "outside the sequence". Whole-sequence synthesis zero-pads at every conv boundary, so the
windowed graphs zero the embedding at -1 positions and multiply every conv output by the validity
mask at that layer's resolution. A window whose middle has enough real context on both sides
(:func:`receptive_field`) then reproduces the whole-sequence output there, and a window at the
sequence start or end reproduces the boundary behaviour exactly.

Module and parameter names follow fairseq (``dict``, ``conv_pre``, ``ups``, ``resblocks``,
``conv_post``, ``dur_predictor.{conv1.0,ln1,conv2.0,ln2,proj}``) so a released checkpoint (with
weight norm removed) loads by name. Convs are plain: fairseq removes weight norm at load.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echostream.config import VocoderConfig
from echostream.contract import duration_context as contract_duration_context

LRELU_SLOPE = 0.1  # fairseq hifigan.LRELU_SLOPE; the last activation uses F.leaky_relu's 0.01
FINAL_LRELU_SLOPE = 0.01
PRE_POST_KERNEL = 7  # conv_pre and conv_post


def _conv_padding(kernel: int, dilation: int = 1) -> int:
    """'Same' padding of an odd-kernel dilated conv (fairseq ``get_padding``)."""
    return (kernel * dilation - dilation) // 2


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x`` [B, C, T] times the validity ``mask`` [B, 1, T] (no-op for the whole-sequence path)."""
    return x if mask is None else x * mask


def _upsample_mask(mask: Tensor, rate: int) -> Tensor:
    """Frame validity [B, 1, T] -> [B, 1, T * rate] (each entry repeated ``rate`` times).

    unsqueeze/expand/flatten rather than ``repeat_interleave`` keeps the graph to static
    Unsqueeze/Expand/Reshape nodes."""
    b, _, t = mask.shape
    return mask.unsqueeze(-1).expand(b, 1, t, rate).flatten(2)


def _valid_ids(ids: Tensor) -> tuple[Tensor, Tensor]:
    """int ids with -1 = none -> (ids safe to embed [B, W] int, validity [B, W] float32).

    Arithmetic instead of clamp/where: TensorRT has no integer Clip."""
    valid = (ids >= 0).to(ids.dtype)
    return ids * valid, valid.to(torch.float32)


def durations_from_log(log_dur: Tensor) -> Tensor:
    """fairseq's rounding: ``max(1, round(exp(log_dur) - 1))`` (round half to even), as int64."""
    return torch.clamp(torch.round(torch.exp(log_dur) - 1.0).long(), min=1)


class ResBlock1(nn.Module):
    """HiFi-GAN residual block type 1: per dilation d, x += conv(lrelu(conv_d(lrelu(x)))).

    Shapes: ``x`` [B, C, T] -> [B, C, T]; ``mask`` [B, 1, T] or None.
    """

    def __init__(self, channels: int, kernel: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=_conv_padding(kernel, d))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, padding=_conv_padding(kernel))
            for _ in dilations
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = _masked(c1(F.leaky_relu(x, LRELU_SLOPE)), mask)
            xt = _masked(c2(F.leaky_relu(xt, LRELU_SLOPE)), mask)
            x = xt + x
        return x


class DurationPredictor(nn.Module):
    """fairseq ``VariancePredictor``: two (Conv1d -> ReLU -> LayerNorm -> dropout) then Linear -> 1.

    Shapes: ``x`` [B, N, E] unit embeddings, ``mask`` [B, N, 1] or None -> log-durations [B, N].
    Dropout is inactive in eval mode and left out (inference only).
    """

    def __init__(self, embed_dim: int, hidden: int, kernel: int):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"duration_kernel must be odd (same padding), got {kernel}")
        pad = (kernel - 1) // 2
        self.conv1 = nn.Sequential(nn.Conv1d(embed_dim, hidden, kernel, padding=pad), nn.ReLU())
        self.ln1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Sequential(nn.Conv1d(hidden, hidden, kernel, padding=pad), nn.ReLU())
        self.ln2 = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        # Masking after ln1 reproduces conv2's zero padding at the sequence edges; the embedding
        # itself is masked by the caller.
        h = self.ln1(self.conv1(x.transpose(1, 2)).transpose(1, 2))
        h = _masked(h, mask)
        h = self.ln2(self.conv2(h.transpose(1, 2)).transpose(1, 2))
        return self.proj(h).squeeze(2)


class CodeHiFiGAN(nn.Module):
    """Unit HiFi-GAN generator + duration predictor (fairseq ``CodeGenerator``, no f0/speaker)."""

    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
            raise ValueError(
                f"upsample_rates {cfg.upsample_rates} and upsample_kernel_sizes "
                f"{cfg.upsample_kernel_sizes} must have the same length")
        if len(cfg.resblock_kernel_sizes) != len(cfg.resblock_dilation_sizes):
            raise ValueError(
                f"resblock_kernel_sizes {cfg.resblock_kernel_sizes} and resblock_dilation_sizes "
                f"{cfg.resblock_dilation_sizes} must have the same length")
        self.cfg = cfg
        self.hop_length = cfg.hop_length
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.dict = nn.Embedding(cfg.num_units, cfg.embedding_dim)
        self.dur_predictor = DurationPredictor(cfg.embedding_dim, cfg.duration_hidden,
                                               cfg.duration_kernel)
        ch = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.embedding_dim, ch, PRE_POST_KERNEL,
                                  padding=_conv_padding(PRE_POST_KERNEL))
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            if (k - u) % 2:
                raise ValueError(f"upsample kernel {k} - rate {u} must be even to give exactly "
                                 f"{u}x the input length")
            c_in, c_out = ch // 2**i, ch // 2 ** (i + 1)
            self.ups.append(nn.ConvTranspose1d(c_in, c_out, k, u, padding=(k - u) // 2))
            for rk, rd in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock1(c_out, rk, list(rd)))
        self.conv_post = nn.Conv1d(ch // 2 ** len(cfg.upsample_rates), 1, PRE_POST_KERNEL,
                                   padding=_conv_padding(PRE_POST_KERNEL))

    # ---- whole-sequence reference ------------------------------------------------------------

    def predict_log_durations(self, units: Tensor) -> Tensor:
        """units [B, N] int (0..num_units-1) -> log-durations [B, N] (every unit real)."""
        self._check_units(units)
        return self.dur_predictor(self.dict(units))

    def predict_durations(self, units: Tensor) -> Tensor:
        """units [B, N] int -> durations [B, N] int64, each >= 1 (fairseq rounding)."""
        return durations_from_log(self.predict_log_durations(units))

    def forward(self, units: Tensor, durations: Tensor | None = None) -> Tensor:
        """Whole-utterance synthesis.

        Args:
            units: [B, N] int, deduplicated unit codes 0..num_units-1.
            durations: [B, N] int frames per unit (>= 1), or None to predict them.
        Returns:
            wav [B, T_max * hop] float32, T_b = sum(durations[b]). With B > 1 and unequal T_b the
            rows are padded with -1 frames and synthesised through the masked path, so each row
            equals its own B=1 synthesis followed by zeros.
        """
        self._check_units(units)
        if durations is None:
            durations = self.predict_durations(units)
        if durations.shape != units.shape:
            raise ValueError(f"durations shape expected {list(units.shape)}, "
                             f"got {list(durations.shape)}")
        if bool((durations < 1).any()):
            raise ValueError("every duration must be >= 1 frame, got "
                             f"min {int(durations.min())}")
        rows = [expand_units(u, d) for u, d in zip(units, durations)]
        if len(rows) == 1:
            return self.generate(self.dict(rows[0]).unsqueeze(0), None)
        frames = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)
        return self.vocoder_step(frames)

    # ---- windowed stage graphs (contract: duration_contract / vocoder_contract) ---------------

    def duration_step(self, ids: Tensor) -> Tensor:
        """Stage ``duration``: ids [B, Wd] int32 units (-1 = no unit) -> log_dur [B, Wd] float32.

        -1 positions act as the zero padding of the whole-sequence predictor; their output is 0.
        """
        safe, valid = _valid_ids(ids)
        mask = valid.unsqueeze(-1)  # [B, Wd, 1]
        log_dur = self.dur_predictor(self.dict(safe) * mask, mask)
        return log_dur * valid

    def vocoder_step(self, ids: Tensor) -> Tensor:
        """Stage ``vocoder``: ids [B, Wv] int32 expanded unit frames (-1 = no frame) ->
        wav [B, Wv * hop] float32; samples of -1 frames are 0."""
        safe, valid = _valid_ids(ids)
        mask = valid.unsqueeze(1)  # [B, 1, Wv]
        emb = self.dict(safe) * valid.unsqueeze(-1)
        return self.generate(emb, mask)

    def generate(self, emb: Tensor, mask: Tensor | None) -> Tensor:
        """The generator: emb [B, T, E] expanded frame embeddings -> wav [B, T * hop].

        ``mask`` [B, 1, T] float (1 = real frame, 0 = outside the utterance; the embedding must
        already be 0 there) or None when every frame is real (the plain fairseq computation).
        """
        x = _masked(self.conv_pre(emb.transpose(1, 2)), mask)
        for i, up in enumerate(self.ups):
            if mask is not None:
                mask = _upsample_mask(mask, self.cfg.upsample_rates[i])
            x = _masked(up(F.leaky_relu(x, LRELU_SLOPE)), mask)
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            xs = blocks[0](x, mask)
            for block in blocks[1:]:
                xs = xs + block(x, mask)
            x = xs / self.num_kernels
        x = torch.tanh(self.conv_post(F.leaky_relu(x, FINAL_LRELU_SLOPE)))
        return _masked(x, mask).squeeze(1)

    def _check_units(self, units: Tensor) -> None:
        if units.dim() != 2 or units.dtype.is_floating_point:
            raise ValueError(f"units expected an integer [B, N] tensor, got {units.dtype} "
                             f"{list(units.shape)}")
        if units.numel() and (int(units.min()) < 0 or int(units.max()) >= self.cfg.num_units):
            raise ValueError(f"unit codes expected in 0..{self.cfg.num_units - 1}, got "
                             f"{int(units.min())}..{int(units.max())}")


def expand_units(units: Tensor, durations: Tensor) -> Tensor:
    """units [N], durations [N] -> frame ids [sum(durations)] (each unit repeated)."""
    return torch.repeat_interleave(units, durations.long())


def duration_context(cfg: VocoderConfig) -> int:
    """Units of context each side a duration prediction depends on (two k-convs)."""
    return contract_duration_context(cfg.duration_kernel)


def receptive_field(cfg: VocoderConfig) -> tuple[int, int]:
    """(left, right) unit frames that the samples of one frame depend on, exactly.

    Walks the output-sample interval of frame 0 back through conv_post, each stage's MRF blocks
    and transposed conv, and conv_pre. A vocoder window with at least this many real frames on each
    side of its chunk reproduces whole-sequence synthesis there (up to float rounding).
    """
    def conv_back(lo: int, hi: int, reach: int) -> tuple[int, int]:
        return lo - reach, hi + reach

    def block_reach(k: int, dils: list[int]) -> int:
        return sum(_conv_padding(k, d) + _conv_padding(k) for d in dils)

    lo, hi = conv_back(0, cfg.hop_length - 1, _conv_padding(PRE_POST_KERNEL))  # conv_post
    for u, k in reversed(list(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))):
        r = max(block_reach(rk, list(rd))
                for rk, rd in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        lo, hi = conv_back(lo, hi, r)
        # ConvTranspose: output j reads input i iff i*u <= j + p <= i*u + k - 1.
        p = (k - u) // 2
        lo, hi = math.ceil((lo + p - k + 1) / u), math.floor((hi + p) / u)
    lo, hi = conv_back(lo, hi, _conv_padding(PRE_POST_KERNEL))  # conv_pre
    return -lo, hi

