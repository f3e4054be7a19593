"""The one place where every stage's tensor names, shapes and dtypes are declared.

Shared by export (graph I/O names, dynamic axes), the runtime (zero states, input checks) and the
tests. No torch here: the runtime imports this module.

Conventions (DESIGN §4):
- batch is axis 0 of every tensor and the only dynamic axis (written ``"B"`` in shapes);
- the main input is ``x``, the main output ``y``; a state ``s`` is an input ``s`` and an output
  ``next_s`` of the same shape and dtype; a *context* input is state owned by another stage that
  this stage only reads (e.g. the MT decoder reads the cross-attention cache kept by ``mt_source``);
- counters are int32 ``[B]``; per-layer caches are stacked ``[B, layers, slots, dim]``;
- a state with zero capacity (memory off, no left context) is left out, never zero-length.

Every builder takes the typed model config (:class:`echostream.config.EchoStreamConfig`) or its
plain-dict form (``manifest.json``'s ``config``), which is converted once. Every derived size
(windows, hops, capacities) is a function here, so export, runtime and tests agree on it; the
per-stage *state* specs are functions of explicit sizes, so a module can build its own state
contract from its constructor arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

from echostream.config import EchoStreamConfig

Config = Union[EchoStreamConfig, Mapping[str, Any]]

BATCH = "B"
FLOAT32 = "float32"
INT32 = "int32"

STAGE_NAMES = (
    "encoder",
    "st_ctc",
    "mt_source",
    "mt_decoder",
    "unit_decoder",
    "duration",
    "vocoder",
)
# Graphs only the ``exact`` fidelity mode runs (StreamSpeech's agent re-decodes the sentence).
EXACT_STAGE_NAMES = ("unit_sentence",)
# The unit decoder over ``short_target_tokens`` text states: the stage a sentence starts on when the
# artifacts have it (``unit_decoder`` takes over when the sentence outgrows it).
UNIT_SHORT_STAGE = "unit_decoder_short"
OPTIONAL_STAGE_NAMES = (UNIT_SHORT_STAGE,)
ALL_STAGE_NAMES = STAGE_NAMES + EXACT_STAGE_NAMES + OPTIONAL_STAGE_NAMES


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor: shape entries are ints or ``"B"`` (the dynamic batch axis)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str = FLOAT32

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass(frozen=True)
class StageContract:
    """I/O of one stage graph, in graph order.

    ``inputs`` = data inputs, then context inputs, then states; ``outputs`` = data outputs, then
    ``next_<state>`` for every state, in the same order as the state inputs.
    """

    stage: str
    data_inputs: tuple[TensorSpec, ...]
    data_outputs: tuple[TensorSpec, ...]
    states: tuple[TensorSpec, ...] = ()
    context: tuple[TensorSpec, ...] = ()

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.data_inputs + self.context + self.states

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.data_outputs + tuple(
            TensorSpec(next_name(s.name), s.shape, s.dtype) for s in self.states
        )

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def state_names(self) -> list[str]:
        return [t.name for t in self.states]

    def spec(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"stage {self.stage!r} has no tensor {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "data_inputs": [t.to_dict() for t in self.data_inputs],
            "data_outputs": [t.to_dict() for t in self.data_outputs],
            "states": [t.to_dict() for t in self.states],
            "context": [t.to_dict() for t in self.context],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageContract":
        def specs(key: str) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec.from_dict(t) for t in d.get(key, []))

        return cls(d["stage"], specs("data_inputs"), specs("data_outputs"), specs("states"),
                   specs("context"))


def next_name(state: str) -> str:
    return f"next_{state}"


def as_config(cfg: Config) -> EchoStreamConfig:
    """The typed config (a plain dict, e.g. a manifest's, is validated and converted)."""
    return cfg if isinstance(cfg, EchoStreamConfig) else EchoStreamConfig.from_dict(dict(cfg))


def state_contract(stage: str, states: tuple[TensorSpec, ...]) -> StageContract:
    """A contract holding only ``states``: what a module validates its state against."""
    return StageContract(stage, (), (), tuple(states))


# ---- derived sizes (shared with the runtime) --------------------------------------------------


ENCODER_WINDOW_LEAD = 3  # fbank frames an Emformer window starts before its segment (Conv2D)
CONV1D_SUBSAMPLER_KERNEL = 5  # StreamSpeech's Conv1dSubsampler kernels ("5,5")
CONFORMER_FRAME_FBANK = 4  # fbank frames (10 ms) per encoder frame (40 ms) after two stride-2 convs


def encoder_kind(cfg: Config) -> str:
    return as_config(cfg).encoder.kind


def conformer_conv_chunk(chunk_size: int) -> int:
    """Chunk of every chunk-causal conv of StreamSpeech's Conformer, in that conv's own input frames,
    for attention chunk ``C``: 16 if C >= 16 else 8 (the agent, ``speech_to_speech.streamspeech.
    agent.py:404-413``)."""
    return 16 if chunk_size >= 16 else 8


def conformer_block_chunks(chunk_size: int) -> int:
    """Attention chunks per block ``R = lcm(C, c) / C`` (``c`` = conv chunk): the smallest span
    whose end is a chunk end of every conv and of the attention, so a step that holds a whole block
    equals the full pass. R = 1 for C = 8, 16, 32, ...; R = 2 for C = 4, 12, 24, 40, ...

    Raises:
        ValueError: the subsampler's conv chunks do not tile an encoder chunk (``c`` must divide
            ``2C``), so no fixed fbank window per chunk exists.
    """
    C = int(chunk_size)
    c = conformer_conv_chunk(C)
    if C < 1 or (2 * C) % c:
        raise ValueError(f"encoder.chunk_size {C} cannot stream: its conv chunk {c} must divide 2C "
                         "(the subsampler's frames per chunk); expected 4, 8, 12 or a multiple of "
                         "8 from 16")
    return c // math.gcd(C, c)


def encoder_step_frames(cfg: Config) -> int:
    """Encoder frames one encoder call emits: the Emformer segment S, or the Conformer chunk C."""
    enc = as_config(cfg).encoder
    return int(enc.chunk_size if enc.kind == "conformer" else enc.segment_length)


def encoder_window_lead(cfg: Config) -> int:
    """Fbank frames an encoder window starts before the first frame of its step: 3 for the Conv2D
    subsampler (see :func:`encoder_window_frames`), ``kernel // 2`` = 2 for the Conformer's first
    conv (its left context rides in the window instead of in the state)."""
    if encoder_kind(cfg) == "conformer":
        return CONV1D_SUBSAMPLER_KERNEL // 2
    return ENCODER_WINDOW_LEAD


def encoder_window_frames(cfg: Config) -> int:
    """Fbank frames read per encoder step.

    Emformer: 4(S+R)+3. Two 3x3 stride-2 convs with padding 1: encoder frame ``u`` reads fbank
    frames ``4u-3 .. 4u+3``, so the window of step ``k`` covers fbank frames ``[4Sk - 3, 4Sk +
    4(S+R))`` (zeros before the sentence) and yields frames ``Sk .. Sk+S+R-1`` exactly as the full
    pass does.

    Conformer: 2 + 4C. Chunk ``k`` is fbank frames ``[4Ck, 4C(k+1))`` (its convs never read past a
    chunk end) plus the first conv's 2 frames of left context before it (zeros before the sentence).
    """
    if encoder_kind(cfg) == "conformer":
        return encoder_window_lead(cfg) + encoder_hop_frames(cfg)
    enc = as_config(cfg).encoder
    return 4 * (enc.segment_length + enc.right_context) + ENCODER_WINDOW_LEAD


def encoder_hop_frames(cfg: Config) -> int:
    """Fbank frames the encoder window advances per step: 4S (Emformer) or 4C (Conformer)."""
    return CONFORMER_FRAME_FBANK * encoder_step_frames(cfg)


def fbank_window_shift(sample_rate: int, frame_length_ms: float,
                       frame_shift_ms: float) -> tuple[int, int]:
    """(window, shift) of the fbank in samples (truncated, as Kaldi)."""
    return (int(int(sample_rate) * float(frame_length_ms) / 1000.0),
            int(int(sample_rate) * float(frame_shift_ms) / 1000.0))


def fbank_frame_count(num_samples: int, window: int, shift: int) -> int:
    """Fbank frames of ``num_samples`` samples with snip_edges (whole windows only):
    ``1 + (N - window) // shift``, 0 if ``N < window`` (window and shift in samples)."""
    return 0 if num_samples < window else 1 + (num_samples - window) // shift


def subsampled_frame_count(fbank_frames: int) -> int:
    """Encoder frames of the full pass over ``fbank_frames`` (either 4x subsampler: two stride-2
    convs, ``kernel // 2`` padding): ``(F - 1) // 4 + 1``, 0 for none."""
    return (fbank_frames - 1) // 4 + 1 if fbank_frames > 0 else 0


def encoder_has_valid_input(cfg: Config) -> bool:
    """Whether the encoder stage takes ``valid_frames`` (the Conformer: a partial last chunk is
    computed as the full pass computes it; the Emformer's right context has no such input)."""
    return encoder_kind(cfg) == "conformer"


def sentence_source_frames(cfg: Config) -> int:
    """Encoder frames one sentence may hold: the ST CTC and MT cross-attention capacity."""
    return int(as_config(cfg).sentence.max_source_frames)


def sentence_target_tokens(cfg: Config) -> int:
    """Target tokens one sentence may hold: the MT self-attention, T2U and unit cross-attention
    capacity (text states before the current one; ``</s>`` + N tokens give N + 1 text states)."""
    return int(as_config(cfg).sentence.max_target_tokens)


def short_target_tokens(cfg: Config) -> int:
    """Text states of the short unit-decoder graph; 0 when the config exports none (unset, or not
    shorter than the sentence)."""
    s = as_config(cfg).sentence
    short = int(s.short_target_tokens)
    return short if 0 < short < int(s.max_target_tokens) else 0


def unit_self_capacity(cfg: Config) -> int:
    """Upsampled positions the unit self-attention caches: every row of the previous
    ``max_target_tokens`` text states."""
    return int(as_config(cfg).unit.upsample) * sentence_target_tokens(cfg)


def vocoder_window_frames(cfg: Config) -> int:
    v = as_config(cfg).vocoder
    return v.window_left + v.window_chunk + v.window_right


def vocoder_hop(cfg: Config) -> int:
    """Waveform samples per unit frame: the product of the upsample rates (320 at 16 kHz)."""
    return as_config(cfg).vocoder.hop_length


def duration_context(kernel: int) -> int:
    """Units of context each side a duration prediction needs (two ``kernel``-wide convs)."""
    return 2 * ((int(kernel) - 1) // 2)


def integer_range(stage: str, cfg: Config, name: str = "x") -> tuple[int, int]:
    """``[low, high)`` of a stage's integer data input: target tokens, unit ids (-1 = none), the
    conformer encoder's valid fbank frames, a sentence's text states, a pad flag."""
    c = as_config(cfg)
    if name == "is_pad":
        return 0, 2
    if stage == "unit_sentence":
        return 1, sentence_text_states(c) + 1
    if stage == "mt_decoder":
        return 0, c.ctc.tgt_vocab_size
    if stage in ("duration", "vocoder"):
        return -1, c.vocoder.num_units
    if stage == "encoder" and encoder_has_valid_input(c):
        return 1, encoder_hop_frames(c) + 1
    raise ValueError(f"stage {stage!r} has no integer data input")


# ---- state specs from explicit sizes (one per stateful module) ----------------------------------


def emformer_states(layers: int, d: int, memory: int, left: int) -> tuple[TensorSpec, ...]:
    """Emformer memory bank and left-context K/V per layer (left out at zero size) + counter."""
    states = []
    if memory > 0:
        states.append(TensorSpec("memory", (BATCH, layers, memory, d)))
    if left > 0:
        states.append(TensorSpec("left_keys", (BATCH, layers, left, d)))
        states.append(TensorSpec("left_values", (BATCH, layers, left, d)))
    states.append(TensorSpec("processed_segments", (BATCH,), INT32))
    return tuple(states)


def conformer_states(layers: int, d: int, frames: int, subsampling_channels: int, kernel: int,
                     chunk: int) -> tuple[TensorSpec, ...]:
    """Chunk Conformer: per-layer self-attention K/V of the sentence (``frames`` slots), the
    subsampler's second conv's left context, every depthwise conv's left context, the block's
    earlier chunks (only when a block holds R > 1 chunks), the counter."""
    blocks = conformer_block_chunks(chunk)
    cache = (BATCH, layers, frames, d)
    states = [TensorSpec("keys", cache), TensorSpec("values", cache),
              TensorSpec("subsample_context", (BATCH, CONV1D_SUBSAMPLER_KERNEL // 2,
                                               subsampling_channels // 2))]
    if kernel // 2:
        states.append(TensorSpec("conv_context", (BATCH, layers, kernel // 2, d)))
    if blocks > 1:
        states.append(TensorSpec("block_frames", (BATCH, (blocks - 1) * chunk, d)))
    states.append(TensorSpec("processed_chunks", (BATCH,), INT32))
    return tuple(states)


def st_ctc_states(layers: int, frames: int, d: int) -> tuple[TensorSpec, ...]:
    """ST CTC transformer layers' K/V over the sentence + counter (none for a linear head)."""
    if layers <= 0:
        return ()
    shape = (BATCH, layers, frames, d)
    return (TensorSpec("keys", shape), TensorSpec("values", shape),
            TensorSpec("processed_frames", (BATCH,), INT32))


def cross_cache_states(layers: int, frames: int, d: int) -> tuple[TensorSpec, ...]:
    """The MT cross-attention K/V of the sentence's source frames + counter (``mt_source``)."""
    shape = (BATCH, layers, frames, d)
    return (TensorSpec("cross_keys", shape), TensorSpec("cross_values", shape),
            TensorSpec("source_frames", (BATCH,), INT32))


def mt_self_states(layers: int, tokens: int, d: int) -> tuple[TensorSpec, ...]:
    """The MT decoder's self-attention K/V of the previous tokens + position counter."""
    shape = (BATCH, layers, tokens, d)
    return (TensorSpec("self_keys", shape), TensorSpec("self_values", shape),
            TensorSpec("target_positions", (BATCH,), INT32))


def unit_decoder_states(t2u_layers: int, layers: int, text: int, upsample: int, d: int,
                        heads: int) -> tuple[TensorSpec, ...]:
    """T2U K/V, unit cross-attention K/V (``text`` text states), one unit self-attention K/V pair
    per layer (``upsample * text`` rows, heads-major) + counter.

    The self-attention caches are 90 % of the stage's state and rewritten at every call, so each
    layer's pair is its own tensor in the layout attention reads (``[B, H, rows, D/H]``): a step
    then copies each of them exactly twice (the ``cat`` attention reads, the FIFO slice), with no
    per-layer gather, transpose or re-stack.
    """
    t2u = (BATCH, t2u_layers, text, d)
    cross = (BATCH, layers, text, d)
    own = (BATCH, heads, upsample * text, d // heads)
    per_layer = tuple(TensorSpec(name, own) for i in range(layers)
                      for name in unit_self_state_names(i))
    return (TensorSpec("t2u_keys", t2u), TensorSpec("t2u_values", t2u),
            TensorSpec("cross_keys", cross), TensorSpec("cross_values", cross),
            *per_layer, TensorSpec("text_positions", (BATCH,), INT32))


def unit_self_state_names(layer: int) -> tuple[str, str]:
    """The unit decoder's self-attention key and value state names of ``layer``."""
    return f"unit_keys_{layer}", f"unit_values_{layer}"


# ---- per-stage contracts ----------------------------------------------------------------------


def encoder_contract(cfg: Config) -> StageContract:
    c = as_config(cfg)
    enc = c.encoder
    if enc.kind == "conformer":
        return conformer_encoder_contract(c)
    if enc.kind != "emformer":
        raise ValueError(f"encoder kind expected 'emformer' or 'conformer', got {enc.kind!r}")
    S, d = enc.segment_length, enc.d_model
    return StageContract(
        "encoder",
        data_inputs=(TensorSpec("x", (BATCH, encoder_window_frames(c), enc.input_dim)),),
        data_outputs=(
            TensorSpec("y", (BATCH, S, d)),
            TensorSpec("asr_log_probs", (BATCH, S, c.ctc.src_vocab_size)),
        ),
        states=emformer_states(enc.num_layers, d, enc.memory_size, enc.left_context),
    )


def conformer_encoder_contract(cfg: Config) -> StageContract:
    """StreamSpeech's chunk Conformer, one call per attention chunk of C encoder frames.

    Inputs: ``x`` the fbank window (:func:`encoder_window_frames`), ``valid_frames`` int32 ``[B]``
    real fbank frames of the chunk (``4C``; fewer only for a sentence's last chunk). States: see
    :func:`conformer_states`.
    """
    c = as_config(cfg)
    enc = c.encoder
    C, d = enc.chunk_size, enc.d_model
    return StageContract(
        "encoder",
        data_inputs=(TensorSpec("x", (BATCH, encoder_window_frames(c), enc.input_dim)),
                     TensorSpec("valid_frames", (BATCH,), INT32)),
        data_outputs=(TensorSpec("y", (BATCH, C, d)),
                      TensorSpec("asr_log_probs", (BATCH, C, c.ctc.src_vocab_size))),
        states=conformer_states(enc.num_layers, d, sentence_source_frames(c),
                                enc.subsampling_channels, enc.depthwise_kernel, C),
    )


def st_ctc_contract(cfg: Config) -> StageContract:
    c = as_config(cfg)
    S, d = encoder_step_frames(c), c.encoder.d_model
    return StageContract(
        "st_ctc",
        data_inputs=(TensorSpec("x", (BATCH, S, d)),),
        data_outputs=(TensorSpec("y", (BATCH, S, c.ctc.tgt_vocab_size)),),
        states=st_ctc_states(c.ctc.st_layers, sentence_source_frames(c), d),
    )


def _cross_cache(c: EchoStreamConfig) -> tuple[TensorSpec, ...]:
    return cross_cache_states(c.mt.num_layers, sentence_source_frames(c), c.mt.d_model)


def mt_source_contract(cfg: Config) -> StageContract:
    """Projects new encoder frames to every MT layer's cross-attention K/V and appends them."""
    c = as_config(cfg)
    return StageContract(
        "mt_source",
        data_inputs=(TensorSpec("x", (BATCH, encoder_step_frames(c), c.encoder.d_model)),),
        data_outputs=(),
        states=_cross_cache(c),
    )


def mt_decoder_contract(cfg: Config) -> StageContract:
    """One target token in -> next-token log-probs and the final hidden state (D_text) out."""
    c = as_config(cfg)
    return StageContract(
        "mt_decoder",
        data_inputs=(TensorSpec("x", (BATCH,), INT32), TensorSpec("is_pad", (BATCH,), INT32)),
        data_outputs=(
            TensorSpec("y", (BATCH, c.ctc.tgt_vocab_size)),
            TensorSpec("hidden", (BATCH, c.mt.d_model)),
        ),
        context=_cross_cache(c),
        states=mt_self_states(c.mt.num_layers, sentence_target_tokens(c), c.mt.d_model),
    )


def unit_decoder_contract(cfg: Config, stage: str = "unit_decoder") -> StageContract:
    """One committed text state in -> `upsample` unit-CTC frames (log-probs) out."""
    c = as_config(cfg)
    u = c.unit
    text = short_target_tokens(c) if stage == UNIT_SHORT_STAGE else sentence_target_tokens(c)
    if not text:
        raise ValueError(f"{stage}: the config exports no short unit-decoder graph "
                         f"(sentence.short_target_tokens={c.sentence.short_target_tokens}, "
                         f"max_target_tokens={c.sentence.max_target_tokens})")
    return StageContract(
        stage,
        data_inputs=(TensorSpec("x", (BATCH, c.mt.d_model)),),
        data_outputs=(TensorSpec("y", (BATCH, u.upsample, u.num_classes)),),
        states=unit_decoder_states(u.t2u_layers, u.num_layers, text, u.upsample, u.d_model,
                                   u.num_heads),
    )


def unit_short_contract(cfg: Config) -> StageContract:
    """``unit_decoder`` over ``short_target_tokens`` text states (ValueError when the config
    exports none)."""
    return unit_decoder_contract(cfg, UNIT_SHORT_STAGE)


def exported_stage_names(cfg: Config, sentence_graphs: bool = False) -> tuple[str, ...]:
    """The stages an export of ``cfg`` writes by default, in pipeline order."""
    names = STAGE_NAMES + (EXACT_STAGE_NAMES if sentence_graphs else ())
    return names + ((UNIT_SHORT_STAGE,) if short_target_tokens(cfg) else ())


def sentence_text_states(cfg: Config) -> int:
    """Text states a sentence graph holds: ``</s>`` + ``max_target_tokens`` tokens + one pad
    position (the agent's whole-word final MT input ends with one)."""
    return sentence_target_tokens(cfg) + 2


def unit_sentence_contract(cfg: Config) -> StageContract:
    """The exact mode's unit decoding: every text state of the sentence (padded to the capacity,
    ``lengths`` real ones) -> the unit-CTC log-probs of all their rows, full cross-attention."""
    c = as_config(cfg)
    N = sentence_text_states(c)
    return StageContract(
        "unit_sentence",
        data_inputs=(TensorSpec("x", (BATCH, N, c.mt.d_model)),
                     TensorSpec("lengths", (BATCH,), INT32)),
        data_outputs=(TensorSpec("y", (BATCH, c.unit.upsample * N, c.unit.num_classes)),),
    )


def duration_contract(cfg: Config) -> StageContract:
    """Unit ids (-1 = no unit) -> predicted log-durations, over a fixed window of units."""
    w = as_config(cfg).vocoder.duration_window
    return StageContract(
        "duration",
        data_inputs=(TensorSpec("x", (BATCH, w), INT32),),
        data_outputs=(TensorSpec("y", (BATCH, w)),),
    )


def vocoder_contract(cfg: Config) -> StageContract:
    """Expanded unit frames (-1 = no frame) -> waveform, over a fixed window of frames."""
    w = vocoder_window_frames(cfg)
    return StageContract(
        "vocoder",
        data_inputs=(TensorSpec("x", (BATCH, w), INT32),),
        data_outputs=(TensorSpec("y", (BATCH, w * vocoder_hop(cfg))),),
    )


CONTRACT_BUILDERS: dict[str, Callable[[Config], StageContract]] = {
    "encoder": encoder_contract,
    "st_ctc": st_ctc_contract,
    "mt_source": mt_source_contract,
    "mt_decoder": mt_decoder_contract,
    "unit_decoder": unit_decoder_contract,
    UNIT_SHORT_STAGE: unit_short_contract,
    "unit_sentence": unit_sentence_contract,
    "duration": duration_contract,
    "vocoder": vocoder_contract,
}


def stage_contract(stage: str, cfg: Config) -> StageContract:
    try:
        builder = CONTRACT_BUILDERS[stage]
    except KeyError:
        raise ValueError(f"unknown stage {stage!r}; expected one of {list(ALL_STAGE_NAMES)}") from None
    return builder(cfg)
