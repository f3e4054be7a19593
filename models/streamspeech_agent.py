"""StreamSpeech's simultaneous S2ST agent, written from its semantics in PyTorch: the reference of
the runtime's ``exact`` fidelity mode.

What ``agent/speech_to_speech.streamspeech.agent.py`` (``policy()``, commit 375a73a) computes at
every call, one call per source segment (SimulEval sends ``segment_ms`` of audio, then calls the
policy once; at the source end once more with the source finished), on the audio received so far:

1. **Encode everything.** Fbank + global CMVN over all samples, the whole encoder over all frames
   (the chunk Conformer with attention chunk ``segment_ms // 40``; nothing is cached).
2. **CTC.** Greedy ASR-CTC and ST-CTC over all frames (pad and unk never chosen; repeats merged;
   blank and pad dropped).
3. **READ test** (source not finished): READ unless both token counts grew by ``stride_n`` since
   the counts stored at the last test that passed; a passing test stores the new counts.
   Budget ``(st - k1) // n * n`` (+1 in whole-word mode, ``segment_ms >= 640``); new tokens =
   budget - stored target length; READ if < 1. At the source end: no test, no budget.
4. **MT.** Greedy decoding with the stored target prefix forced, re-run against all frames, at
   most that many new tokens (``max_len = prefix + new``); at the source end ``max_len = 100``
   (``max_len_b``). ``</s>`` is banned as the first token, ``<pad>`` always; at ``max_len`` only
   ``</s>`` may follow. Whole-word mode (source not finished): cut the hypothesis before its last
   token that starts a word (the prefix included: the stored prefix can shrink); READ if that
   leaves nothing.
5. If the stored prefix equals the new hypothesis: READ (at the source end: finish). Else store it.
   Source not finished: READ unless the MT input ``[</s>] + hypothesis`` (padded to the
   hypothesis length + 1, + 1 more in whole-word mode) got longer than the previous one.
6. **T2U + units.** The MT decoder's final-LN states over that input (pads are masked keys), the
   causal T2U encoder, the unit decoder with *full* cross-attention over the whole text, greedy
   unit CTC: the full unit sequence, recomputed from scratch. READ if it has no unit beyond the
   count already voiced.
7. **Vocoder.** The whole unit sequence with predicted durations; emit the tail of
   ``sum(durations of the new units) * hop`` samples. Earlier units that changed are never
   re-spoken.
8. At the source end the call finishes the target (and resets the agent).

Two inputs are EchoStream's, not the agent's: features arrive already computed (fbank frames are
local to their 25 ms window, so frames computed incrementally equal frames of the whole prefix;
the agent also assumes 48 kHz input and resamples, which we do not reproduce), and the encoder is
the model's (``encode``: the chunk Conformer's full pass, as the agent; the Emformer's streaming
output for EchoStream models, whose streaming encoder is the thing the agent would call).

Symbols: ``F`` fbank frames, ``T`` encoder frames, ``N`` target tokens, ``U`` upsample, ``D``
width.

Examples:
    >>> agent = StreamSpeechAgent(model, AgentConfig(segment_ms=320), is_word_start)
    >>> out = agent.policy(features_so_far, source_finished=False)   # one call per segment
    >>> out.read, out.translation, out.new_units, out.samples.shape
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

WHOLE_WORD_MS = 640
FAIRSEQ_MAX_POSITIONS = 1024  # mt decoder max_target_positions: fairseq caps max_len at 1023


@dataclass(frozen=True)
class AgentConfig:
    """The agent's knobs (its command-line defaults)."""

    segment_ms: int = 320
    stride_n: int = 1
    lagging_k1: int = 0
    final_max_len: int = 100  # generator_mt max_len_b at the source end
    min_len: int = 1
    capacity: int | None = None  # EchoStream's sentence capacity (max_target_tokens): no
    # hypothesis grows past it (the agent has none; within it nothing changes)

    @property
    def whole_word(self) -> bool:
        return self.segment_ms >= WHOLE_WORD_MS

    @property
    def chunk_size(self) -> int:
        """The encoder's attention chunk the agent sets (encoder frames of 40 ms)."""
        return self.segment_ms // 40


@dataclass
class AgentOutput:
    """What one policy call decided and produced.

    ``asr_tokens``: the greedy ASR-CTC hypothesis over all frames; ``translation``: the stored
    target prefix after the call; ``units``: the full unit sequence decoded at this call (empty when
    no decode happened); ``new_units``: the units voiced by this call; ``samples``: float32 speech.
    """

    read: bool
    asr_tokens: list[int] = field(default_factory=list)
    st_count: int = 0
    translation: list[int] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    new_units: list[int] = field(default_factory=list)
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    finished: bool = False


def greedy_ctc(log_probs: Tensor, blank: int, pad: int, unk: int) -> list[int]:
    """fairseq/agent greedy CTC over ``[T, V]`` scores: pad and unk never win, merge repeats,
    drop blank and pad."""
    scores = log_probs.clone()
    scores[:, pad] = -math.inf
    scores[:, unk] = -math.inf
    labels = scores.argmax(dim=-1).tolist()
    merged = [v for i, v in enumerate(labels) if i == 0 or v != labels[i - 1]]
    return [v for v in merged if v not in (blank, pad)]


class StreamSpeechAgent:
    """One stream of StreamSpeech's agent on an ``EchoStreamModel`` (see the module docstring).

    Args:
        model: the reference model (eval mode).
        cfg: the agent's knobs.
        is_word_start: target token id -> its piece starts with "▁".
        encode: ``(features [F, 80], source_finished) -> frames [T, D]``; default: the model's
            encoder as the agent runs it (:func:`agent_encoder`).
    """

    def __init__(self, model: torch.nn.Module, cfg: AgentConfig,
                 is_word_start: Callable[[int], bool],
                 encode: Callable[[Tensor, bool], Tensor] | None = None):
        self.model, self.cfg, self.is_word_start = model, cfg, is_word_start
        self.encode = encode or agent_encoder(model, cfg)
        mt = model.cfg.mt
        self.bos, self.pad, self.eos, self.unk = mt.bos, mt.pad, mt.eos, mt.unk
        self.reset()

    def reset(self) -> None:
        self.src_count = 0
        self.tgt_count = 0
        self.prefix: list[int] | None = None  # tgt_subwords_indices
        self.last_mt_input: list[int] | None = None  # prev_output_tokens_mt
        self.voiced: list[int] | None = None  # self.unit

    # ---- one call ---------------------------------------------------------------------------

    @torch.inference_mode()
    def policy(self, features: Tensor | np.ndarray, source_finished: bool) -> AgentOutput:
        """One policy call on every feature frame received so far (``[F, 80]``, normalised)."""
        features = torch.as_tensor(np.asarray(features, np.float32))
        if features.shape[0] == 0:
            return self._finish() if source_finished else AgentOutput(read=True)
        frames = self.encode(features, source_finished)  # [T, D]
        if frames.shape[0] == 0:
            return self._finish() if source_finished else AgentOutput(read=True)
        asr, st = self._ctc(frames)
        out = AgentOutput(read=True, asr_tokens=asr, st_count=len(st),
                          translation=list(self.prefix or []))
        new_tokens = self._budget(len(asr), len(st), source_finished)
        if new_tokens is None:
            return out
        hypothesis, finished_tokens = self._generate(frames, new_tokens)
        if self.cfg.whole_word and not source_finished:
            cut = self._whole_word_cut(hypothesis)
            if cut == 0:
                return out
            hypothesis = finished_tokens = hypothesis[:cut]
        mt_input = self._mt_input(hypothesis, finished_tokens)
        if self.prefix is not None and self.prefix == hypothesis:
            return self._finish(out) if source_finished else out
        self.prefix = hypothesis
        out.translation = list(hypothesis)
        if not source_finished:
            grew = self.last_mt_input is None or (
                mt_input != self.last_mt_input and len(mt_input) > len(self.last_mt_input))
            if not grew:
                return out
        self.last_mt_input = mt_input
        units = self._units(frames, mt_input)
        new = units if self.voiced is None else units[len(self.voiced):]
        if not units or not new:
            return self._finish(out) if source_finished else out
        out.units, out.new_units = units, new
        out.samples = self._speech(units, len(new))
        out.read = False
        self.voiced = units
        if source_finished:
            out.finished = True
            self.reset()
        return out

    def _finish(self, out: AgentOutput | None = None) -> AgentOutput:
        out = out or AgentOutput(read=False)
        out.read, out.finished = False, True
        self.reset()
        return out

    # ---- the parts ----------------------------------------------------------------------------

    def _ctc(self, frames: Tensor) -> tuple[list[int], list[int]]:
        m = self.model
        x = frames.unsqueeze(1)  # [T, 1, D]
        blank = m.cfg.ctc.blank
        asr = greedy_ctc(m.asr_ctc(x)[:, 0], blank, self.pad, self.unk)
        st = greedy_ctc(m.st_ctc(x)[:, 0], blank, self.pad, self.unk)
        return asr, st

    def _budget(self, src_count: int, tgt_count: int, source_finished: bool) -> int | None:
        """New tokens the MT may write now (-1: decode to ``</s>``), or None for READ."""
        if source_finished:
            return -1
        n = self.cfg.stride_n
        if src_count < self.src_count + n or tgt_count < self.tgt_count + n:
            return None
        self.src_count = max(src_count, self.src_count)
        self.tgt_count = max(tgt_count, self.tgt_count)
        budget = (tgt_count - self.cfg.lagging_k1) // n * n + (1 if self.cfg.whole_word else 0)
        new = budget - (len(self.prefix) if self.prefix is not None else 0)
        return new if new >= 1 else None

    def _generate(self, frames: Tensor, new_tokens: int) -> tuple[list[int], list[int]]:
        """Greedy MT with the stored prefix forced, recomputed against all frames at every step.

        Returns (hypothesis without a final ``</s>``, the finalized tokens with it)."""
        prefix = list(self.prefix or [])
        if new_tokens == -1:
            max_len = min(self.cfg.final_max_len, FAIRSEQ_MAX_POSITIONS - 1)
        else:
            max_len = len(prefix) + new_tokens
        if self.cfg.capacity is not None:
            max_len = min(max_len, self.cfg.capacity)
        tokens = list(prefix)
        source = frames.unsqueeze(1)  # [T, 1, E]
        while True:
            step = len(tokens)
            prev = torch.tensor([[self.eos] + tokens])
            log_probs = self.model.mt_decoder(prev, source)[0][0, -1].clone()  # [V]
            if step >= max_len:
                token = self.eos
            else:
                log_probs[self.pad] = -math.inf
                if step < self.cfg.min_len:
                    log_probs[self.eos] = -math.inf
                token = int(log_probs.argmax())
            if token == self.eos:
                return tokens, tokens + [self.eos]
            tokens.append(token)

    def _whole_word_cut(self, hypothesis: list[int]) -> int:
        """The agent's loop: index of the last token that starts a word (0 if none; the length
        of nothing when the hypothesis is empty)."""
        j = 999999
        for j in range(len(hypothesis) - 1, -1, -1):
            if self.is_word_start(hypothesis[j]):
                break
        return j

    def _mt_input(self, hypothesis: list[int], finalized: list[int]) -> list[int]:
        """``prev_output_tokens_mt``: ``[</s>] + hypothesis`` padded to ``len(finalized)``
        (+1 in whole-word mode) with pad."""
        length = len(finalized) + (1 if self.cfg.whole_word else 0)
        row = [self.eos] + hypothesis
        return row + [self.pad] * (length - len(row))

    def _units(self, frames: Tensor, mt_input: list[int]) -> list[int]:
        m = self.model
        prev = torch.tensor([mt_input])
        hidden = m.mt_decoder(prev, frames.unsqueeze(1))[1]  # [1, L, D] final-LN states
        valid = torch.tensor([sum(1 for t in mt_input if t != self.pad)])
        unit_cfg = m.cfg.unit
        log_probs = m.unit_decoder.forward(hidden, valid, cross_attention="full")[0]  # [U*L, K]
        classes = greedy_ctc(log_probs, unit_cfg.blank, self.pad, self.unk)
        specials = range(unit_cfg.unit_offset)
        return [c - unit_cfg.unit_offset for c in classes if c not in specials]

    def _speech(self, units: list[int], new: int) -> np.ndarray:
        voc = self.model.vocoder
        codes = torch.tensor([units])
        durations = voc.predict_durations(codes)  # [1, N]
        wav = voc(codes, durations)[0]
        tail = int(durations[0, -new:].sum()) * voc.hop_length
        return wav[wav.shape[0] - tail:].numpy().astype(np.float32)


# ---- the encoder as the agent calls it --------------------------------------------------------


def agent_encoder(model: torch.nn.Module, cfg: AgentConfig) -> Callable[[Tensor, bool], Tensor]:
    """``(features [F, 80], source_finished) -> frames [T, D]`` for ``model``'s encoder kind.

    Chunk Conformer: the full pass over all frames with attention chunk ``segment_ms // 40`` (the
    agent's ``encoder.chunk_size``; the convs' chunk follows from it). Emformer: the streaming
    encoder's frames (complete segments; at the source end the zero-padded tail, as the runtime).
    """
    kind = model.cfg.encoder.kind
    if kind == "conformer":
        def encode(features: Tensor, finished: bool) -> Tensor:
            lengths = torch.tensor([features.shape[0]])
            out = model.encoder(features.unsqueeze(0), lengths, chunk_size=cfg.chunk_size)
            return out["encoder_out"][0][:, 0]
        return encode
    if kind == "emformer":
        return lambda features, finished: emformer_stream_frames(model, features, finished)
    raise ValueError(f"no agent encoder for encoder kind {kind!r}")


def emformer_stream_frames(model: torch.nn.Module, features: Tensor, finished: bool) -> Tensor:
    """The Emformer's streaming output over ``features``: every complete segment, and at the
    source end the tail segments zero-padded (what the runtime's encoder steps produce)."""
    from echostream.models.subsampling import step_window, subsampled_length

    enc = model.encoder
    S, R = enc.cfg.segment_length, enc.cfg.right_context
    F = features.shape[0]
    steps = max(0, (F - 4 * R) // enc.hop_frames)
    valid = steps * S
    if finished:
        valid = max(0, subsampled_length(F) - R)
        steps = math.ceil(valid / S)
    state, ys = enc.initial_state(1), []
    for k in range(steps):
        y, state = enc.step(step_window(features.unsqueeze(0), k, enc.hop_frames, enc.window_frames),
                            state)
        ys.append(y[0])
    if not ys:
        return features.new_zeros(0, enc.cfg.d_model)
    return torch.cat(ys)[:valid]
