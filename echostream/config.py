"""Model configuration: dataclass presets, JSON round-trippable, no torch.

Three presets (DESIGN §3):
- ``echostream``: the seed — Conv2D 4x subsampling + 16-layer Emformer, 2-layer ST CTC,
  4-layer MT decoder, 2-layer T2U + 6-layer unit decoder, CodeHiFiGAN.
- ``streamspeech``: the released StreamSpeech dims (12-layer chunk Conformer, Conv1d subsampling,
  linear ST CTC, 2+2 unit layers) — the baseline.
- ``tiny``: the same structure with tiny dims, for fast tests.
- ``streamspeech_tiny``: the ``streamspeech`` structure with tiny dims (and the released 6000-piece
  vocabularies), for fast tests of the import and the chunk Conformer.

The one typed config of the project, in the torch-free core: models, export, the contracts and the
runtime all read it. ``manifest.json`` stores it as a plain dict (:meth:`EchoStreamConfig.to_dict`);
the runtime rebuilds the typed form with :meth:`EchoStreamConfig.from_dict` (unknown keys refused).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class FeatureConfig:
    """Kaldi fbank front end (as StreamSpeech: samples scaled to the int16 range)."""

    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0


@dataclass
class EncoderConfig:
    """Subsampling + streaming encoder. Frames after subsampling are 40 ms."""

    kind: str = "emformer"  # "emformer" | "conformer" (StreamSpeech baseline)
    input_dim: int = 80
    d_model: int = 256
    num_layers: int = 16
    num_heads: int = 4
    ffn_dim: int = 2048
    activation: str = "relu"  # Emformer FFN activation (torchaudio default)
    subsampling: str = "conv2d"  # "conv2d" (two 3x3 stride-2) | "conv1d" (StreamSpeech)
    subsampling_channels: int = 256  # conv2d: conv channels; conv1d: first conv channels (1024)
    segment_length: int = 8  # encoder frames per segment (8 x 40 ms = 320 ms)
    right_context: int = 2  # look-ahead frames, hard-copied per layer (Emformer)
    left_context: int = 32  # cached left-context key/value frames per layer
    memory_size: int = 4  # memory-bank slots per layer (0 = off)
    tanh_on_mem: bool = False  # False: clamp new memory to [-10, 10]
    # Conformer baseline only.
    depthwise_kernel: int = 31
    chunk_size: int = 8


@dataclass
class CTCConfig:
    """ASR CTC head (linear) and ST CTC head (`CTCDecoderWithTransformerLayer`)."""

    src_vocab_size: int = 6000
    tgt_vocab_size: int = 6000
    blank: int = 0  # fairseq <s> slot, as StreamSpeech
    st_layers: int = 2  # 0 = plain linear ST CTC head (released StreamSpeech)
    st_num_heads: int = 4
    st_ffn_dim: int = 2048


@dataclass
class SentenceConfig:
    """The sentence capacity every decoder-side window is derived from (DESIGN §3).

    Within it, each streaming module equals StreamSpeech's unbounded causal module exactly: the ST
    CTC layers and the MT cross-attention hold ``max_source_frames`` encoder frames (40 ms each),
    the MT self-attention ``max_target_tokens`` tokens, the T2U encoder and the unit
    cross-attention ``max_target_tokens`` text states, the unit self-attention
    ``upsample x max_target_tokens`` positions. At the capacity the runtime ends the sentence
    (an ``EndOfSentence`` event says so); no window ever slides inside a sentence.

    ``short_target_tokens``: the text states of the unit decoder's short graph
    (``unit_decoder_short``, the same weights with every text window that long). A sentence starts
    on it and moves to the full graph when it outgrows it, its caches padded on the left, so a short
    sentence pays for the attention and the cache copies of its own length, not of the capacity;
    0 (or >= ``max_target_tokens``) exports no short graph.
    """

    max_source_frames: int = 750  # 30 s of 40 ms encoder frames
    max_target_tokens: int = 128
    short_target_tokens: int = 32

    def __post_init__(self) -> None:
        if self.short_target_tokens < 0:
            raise ValueError(f"sentence.short_target_tokens expected >= 0, "
                             f"got {self.short_target_tokens}")


@dataclass
class MTDecoderConfig:
    """Autoregressive MT decoder with fixed-capacity self- and cross-attention caches."""

    num_layers: int = 4
    d_model: int = 512
    num_heads: int = 8
    ffn_dim: int = 2048
    bos: int = 0
    pad: int = 1
    eos: int = 2
    unk: int = 3


UNIT_CROSS_ATTENTION = ("block_causal", "full")


@dataclass
class UnitDecoderConfig:
    """T2U encoder (causal) + CTC unit decoder over each text state repeated `upsample` times."""

    t2u_layers: int = 2
    num_layers: int = 6
    d_model: int = 512
    num_heads: int = 8
    ffn_dim: int = 2048
    upsample: int = 25
    num_classes: int = 1005  # 4 fairseq specials + 1000 units + blank
    blank: int = 1004
    unit_offset: int = 4  # class index of unit 0
    # "block_causal": the rows of text state i see T2U states <= i (incremental, one call per
    # committed text state); "full": every row sees all T2U states of the text (what StreamSpeech's
    # agent runs, re-decoding the sentence at every write). Both are in the released model's
    # training distribution (its criterion draws the block stride n2 per batch).
    cross_attention: str = "block_causal"

    def __post_init__(self) -> None:
        if self.cross_attention not in UNIT_CROSS_ATTENTION:
            raise ValueError(f"unit.cross_attention expected one of {list(UNIT_CROSS_ATTENTION)}, "
                             f"got {self.cross_attention!r}")


@dataclass
class VocoderConfig:
    """CodeHiFiGAN (fairseq `CodeGenerator`) with a duration predictor."""

    num_units: int = 1000
    embedding_dim: int = 128
    upsample_initial_channel: int = 512
    upsample_rates: list[int] = field(default_factory=lambda: [5, 4, 4, 2, 2])
    upsample_kernel_sizes: list[int] = field(default_factory=lambda: [11, 8, 8, 4, 4])
    resblock_kernel_sizes: list[int] = field(default_factory=lambda: [3, 7, 11])
    resblock_dilation_sizes: list[list[int]] = field(
        default_factory=lambda: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    )
    duration_hidden: int = 128
    duration_kernel: int = 3
    # Streaming windows (unit frames / units), used by the exported graphs and the runtime.
    # window_left/right = the generator's receptive field (21 frames each side for these dims,
    # `vocoder.receptive_field`), so streamed audio equals whole-utterance synthesis; a smaller
    # window_right trades that exactness for latency.
    window_left: int = 21  # context frames before the emitted chunk
    window_chunk: int = 16  # frames emitted per vocoder call (320 ms)
    window_right: int = 21  # look-ahead frames after the chunk
    duration_window: int = 32  # units per duration-predictor call (2 context units each side)

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.upsample_rates:
            hop *= r
        return hop


@dataclass
class EchoStreamConfig:
    name: str = "echostream"
    features: FeatureConfig = field(default_factory=FeatureConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    ctc: CTCConfig = field(default_factory=CTCConfig)
    sentence: SentenceConfig = field(default_factory=SentenceConfig)
    mt: MTDecoderConfig = field(default_factory=MTDecoderConfig)
    unit: UnitDecoderConfig = field(default_factory=UnitDecoderConfig)
    vocoder: VocoderConfig = field(default_factory=VocoderConfig)
    seed: int = 0

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EchoStreamConfig":
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in sections:
                raise ValueError(f"unknown config key {key!r}; expected one of {sorted(sections)}")
            sub = _SECTION_TYPES.get(key)
            kwargs[key] = _build(sub, value, key) if sub else value
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "EchoStreamConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "EchoStreamConfig":
        return cls.from_json(Path(path).read_text())


_SECTION_TYPES = {
    "features": FeatureConfig,
    "encoder": EncoderConfig,
    "ctc": CTCConfig,
    "sentence": SentenceConfig,
    "mt": MTDecoderConfig,
    "unit": UnitDecoderConfig,
    "vocoder": VocoderConfig,
}


def _build(cls, value: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(value) - names
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in config section {where!r}")
    return cls(**value)


# ---- presets -------------------------------------------------------------------------------


def echostream_preset() -> EchoStreamConfig:
    return EchoStreamConfig(name="echostream")


def streamspeech_preset() -> EchoStreamConfig:
    """The released StreamSpeech dims (streamspeech-facts.md §1-§7)."""
    return EchoStreamConfig(
        name="streamspeech",
        encoder=EncoderConfig(
            kind="conformer",
            num_layers=12,
            activation="swish",
            subsampling="conv1d",
            subsampling_channels=1024,
            right_context=0,
            left_context=0,
            memory_size=0,
            depthwise_kernel=31,
            chunk_size=8,
        ),
        ctc=CTCConfig(st_layers=0),
        unit=UnitDecoderConfig(t2u_layers=2, num_layers=2),
    )


def tiny_preset() -> EchoStreamConfig:
    return EchoStreamConfig(
        name="tiny",
        encoder=EncoderConfig(
            d_model=32, num_layers=2, num_heads=2, ffn_dim=64, subsampling_channels=8,
            segment_length=4, right_context=1, left_context=8, memory_size=2,
            depthwise_kernel=7, chunk_size=4,
        ),
        ctc=CTCConfig(src_vocab_size=64, tgt_vocab_size=64, st_layers=2, st_num_heads=2,
                      st_ffn_dim=64),
        sentence=SentenceConfig(max_source_frames=256, max_target_tokens=32, short_target_tokens=8),
        mt=MTDecoderConfig(num_layers=2, d_model=32, num_heads=2, ffn_dim=64),
        unit=UnitDecoderConfig(t2u_layers=1, num_layers=2, d_model=32, num_heads=2, ffn_dim=64),
        vocoder=VocoderConfig(embedding_dim=16, upsample_initial_channel=32,
                              resblock_kernel_sizes=[3, 5], resblock_dilation_sizes=[[1, 3], [1, 3]],
                              duration_hidden=16, window_left=8, window_chunk=4, window_right=8,
                              duration_window=8),
    )


def streamspeech_tiny_preset() -> EchoStreamConfig:
    """StreamSpeech's structure (chunk Conformer, Conv1d subsampling, linear ST CTC, 2+2 unit
    layers) at tiny widths, with the released vocabulary sizes (6000), so the real dictionaries of
    ``shared/streamspeech/configs`` fit it: for fast tests of the import and the chunk encoder."""
    tiny = tiny_preset()
    return EchoStreamConfig(
        name="streamspeech_tiny",
        encoder=EncoderConfig(
            kind="conformer", d_model=32, num_layers=2, num_heads=2, ffn_dim=64,
            activation="swish", subsampling="conv1d", subsampling_channels=16, right_context=0,
            left_context=0, memory_size=0, depthwise_kernel=7, chunk_size=8,
        ),
        ctc=CTCConfig(st_layers=0),
        sentence=dataclasses.replace(tiny.sentence),
        mt=dataclasses.replace(tiny.mt),
        unit=UnitDecoderConfig(t2u_layers=2, num_layers=2, d_model=32, num_heads=2, ffn_dim=64),
        vocoder=dataclasses.replace(tiny.vocoder),
    )


PRESETS = {
    "echostream": echostream_preset,
    "streamspeech": streamspeech_preset,
    "tiny": tiny_preset,
    "streamspeech_tiny": streamspeech_tiny_preset,
}


def get_preset(name: str) -> EchoStreamConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None
