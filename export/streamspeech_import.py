"""``echostream import streamspeech``: a released StreamSpeech fairseq checkpoint -> our checkpoint.

Steps (cheap checks first; nothing is written until everything has been checked):

1. read the checkpoint's pickle with the restricted reader (``fairseq_checkpoint``; no tensor data
   yet) and the data folder (``streamspeech_data``: dictionaries, SentencePiece models, CMVN);
2. derive an :class:`EchoStreamConfig` (the ``streamspeech`` preset's structure) from the model
   args, checked field by field against the state dict's shapes and against what EchoStream can
   represent (:func:`derive_config`);
3. plan the mapping of every tensor against a meta-device model of that config (shapes only,
   :func:`plan_mapping`): strict, a missing, unexpected or misshaped key is an error naming it;
4. read and map the tensors (fp16/bf16 sources become fp32), remove the vocoder's weight norm,
   load them into the model, write ``config.json`` + ``weights.safetensors`` + the data files +
   ``import.json`` (provenance) into a temporary folder beside ``--out``, verify it loads, rename.

Key mapping (``reference/streamspeech-fidelity.md``, "Parameter mapping"): ``encoder.*`` ->
``encoder.*``, ``source_unigram_decoder`` -> ``asr_ctc``, ``ctc_target_unigram_decoder`` ->
``st_ctc.ctc``, ``target_unigram_decoder`` -> ``mt_decoder``, ``synthesizer_encoder`` ->
``unit_decoder.t2u``, ``decoder`` -> ``unit_decoder``; inside transformer layers ``fc1``/``fc2`` ->
``ffn.fc1``/``ffn.fc2``. Expected extras: the ``version`` buffers of the two fairseq decoders and
the tied aliases ``target_unigram_decoder.output_projection.weight`` (= its ``embed_tokens``) and
``decoder.embed_tokens.weight`` (= its ``output_projection``); fairseq's loader also drops
``embed_positions._float_tensor``/``.weights`` of old checkpoints, and so do we.

Examples:
    >>> summary = import_streamspeech("streamspeech.simultaneous.fr-en.pt",   # doctest: +SKIP
    ...                               data="configs/fr-en", out="ckpt/fr-en",
    ...                               vocoder="g_00500000", vocoder_config="config.json")
    >>> summary.line()                                                           # doctest: +SKIP
    'imported streamspeech.simultaneous.fr-en.pt -> ckpt/fr-en: 855 tensors ...'
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from echostream.export.fairseq_checkpoint import (
    CheckpointError,
    FairseqCheckpoint,
    TensorRef,
    TorchZipReader,
    read_fairseq_checkpoint,
    read_state_dict,
)
from echostream.export.streamspeech_data import DataFolder, read_data_folder
from echostream.export.vocoder_import import (
    PREFIX as VOCODER_PREFIX,
    check_vocoder_dims,
    materialise_vocoder,
    plan_vocoder,
    read_vocoder_config,
)
from echostream.config import EchoStreamConfig, get_preset

IMPORT_FILE = "import.json"
SRC_DICT, TGT_DICT, CMVN = "src_dict.txt", "tgt_dict.txt", "gcmvn.npz"
SRC_SPM, TGT_SPM = "src_spm.model", "tgt_spm.model"
SEEDED_VOCODER_NOTICE = ("notice: no --vocoder given: the vocoder has seeded random weights; "
                         "synthesised speech will be noise")

# StreamSpeech module prefix -> EchoStream module prefix (fidelity note, "Parameter mapping").
MODULES = (
    ("encoder.", "encoder."),
    ("source_unigram_decoder.", "asr_ctc."),
    ("ctc_target_unigram_decoder.", "st_ctc.ctc."),
    ("target_unigram_decoder.", "mt_decoder."),
    ("synthesizer_encoder.", "unit_decoder.t2u."),
    ("decoder.", "unit_decoder."),
)
VERSION_BUFFERS = ("target_unigram_decoder.version", "decoder.version")
# alias key -> the key it must be the same tensor as (tied input/output embeddings)
ALIASES = {"target_unigram_decoder.output_projection.weight": "target_unigram_decoder.embed_tokens.weight",
           "decoder.embed_tokens.weight": "decoder.output_projection.weight"}
_DEPRECATED = re.compile(r"(target_unigram_decoder|decoder)\.embed_positions\.(_float_tensor|weights)")
_FFN = re.compile(r"(\.layers\.\d+\.)fc([12])\.")
_FFN_BACK = re.compile(r"(\.layers\.\d+\.)ffn\.fc([12])\.")


# ---- key names -------------------------------------------------------------------------------------


def to_echostream_key(key: str) -> str | None:
    """A StreamSpeech state-dict key -> ours (None for keys of no mapped module)."""
    for src, dst in MODULES:
        if key.startswith(src):
            return _FFN.sub(r"\1ffn.fc\2.", dst + key[len(src):])
    return None


def to_streamspeech_key(key: str) -> str:
    """Ours -> StreamSpeech's (for naming a missing key in the checkpoint's own terms)."""
    for src, dst in sorted(MODULES, key=lambda m: -len(m[1])):
        if key.startswith(dst):
            return _FFN_BACK.sub(r"\1fc\2.", src + key[len(dst):])
    return key


# ---- architecture ----------------------------------------------------------------------------------

# What StreamSpeech's argparse/arch functions default to when a setting is absent from the args
# (researches/ctc_unity/models/streamspeech_model.py, fairseq s2s_transformer.py architectures).
ARG_DEFAULTS: dict[str, Any] = {
    "encoder_layers": 16, "encoder_embed_dim": 256, "encoder_ffn_embed_dim": 2048,
    "encoder_attention_heads": 4, "depthwise_conv_kernel_size": 31, "conv_channels": 1024,
    "conv_kernel_sizes": "5,5", "conv_version": "s2t_transformer", "attn_type": None,
    "pos_enc_type": "abs", "chunk_size": -1, "uni_encoder": False, "input_feat_per_channel": 80,
    "input_channels": 1, "translation_decoder_layers": 4, "synthesizer_encoder_layers": 0,
    "decoder_layers": 6, "decoder_attention_heads": 8, "ctc_upsample_rate": 10,
    "n_frames_per_step": 1, "no_scale_embedding": False, "decoder_normalize_before": True,
    "activation_fn": "relu", "share_decoder_input_output_embed": False,
    "synthesizer_augmented_cross_attention": False, "target_speaker_embed": False,
}

# Settings EchoStream's modules implement one way only: (arg, required value, why).
FIXED_ARGS = (
    ("conv_version", "s2t_transformer", "Conv1d subsampler, the streamspeech structure"),
    ("attn_type", "espnet", "ESPnet relative-position attention"),
    ("pos_enc_type", "rel_pos", "relative positions"),
    ("uni_encoder", True, "causal T2U encoder"),
    ("n_frames_per_step", 1, "one unit per decoder frame"),
    ("input_channels", 1, "one fbank channel"),
    ("no_scale_embedding", False, "embeddings scaled by sqrt(d)"),
    ("decoder_normalize_before", True, "pre-LN decoder layers"),
    ("activation_fn", "relu", "ReLU decoder FFNs"),
    ("share_decoder_input_output_embed", True, "tied unit embedding/output table"),
    ("synthesizer_augmented_cross_attention", False, "unit decoder attends T2U states only"),
    ("target_speaker_embed", False, "no speaker embedding"),
)


def model_arg(args: dict[str, Any], name: str) -> Any:
    """A model setting, with StreamSpeech's default when the args do not hold it."""
    value = args.get(name, ARG_DEFAULTS.get(name))
    if name == "decoder_embed_dim" and value is None:
        return model_arg(args, "encoder_embed_dim")
    if name == "decoder_ffn_embed_dim" and value is None:
        return model_arg(args, "encoder_ffn_embed_dim")
    return value


def layer_count(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    """Distinct ``<prefix><i>.`` layer indices among the keys."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({int(m.group(1)) for k in shapes if (m := pattern.match(k))})


def shape_fields(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, Any, str]]:
    """Architecture fields read off the state dict: ``(field, value, where)``. A field whose key is
    absent is left out (the strict key check names that key); a field may appear twice (the MT and
    unit decoders share ``decoder_embed_dim``)."""
    out = [(name, layer_count(shapes, prefix), prefix + "*") for name, prefix in (
        ("encoder_layers", "encoder.conformer_layers."),
        ("translation_decoder_layers", "target_unigram_decoder.layers."),
        ("synthesizer_encoder_layers", "synthesizer_encoder.layers."),
        ("decoder_layers", "decoder.layers."))]
    layer, conv = "encoder.conformer_layers.0.", "encoder.subsample.conv_layers."
    for name, key, axis in (
            ("encoder_embed_dim", "encoder.linear.weight", 0),
            ("encoder_ffn_embed_dim", layer + "ffn1.w_1.weight", 0),
            ("encoder_attention_heads", layer + "self_attn.pos_bias_u", 0),
            ("depthwise_conv_kernel_size", layer + "conv_module.depthwise_conv.weight", 2),
            ("conv_channels", conv + "0.weight", 0),
            ("input_feat_per_channel", conv + "0.weight", 1),
            ("decoder_embed_dim", "decoder.output_projection.weight", 1),
            ("decoder_embed_dim", "target_unigram_decoder.embed_tokens.weight", 1),
            ("decoder_ffn_embed_dim", "decoder.layers.0.fc1.weight", 0)):
        if key in shapes and len(shapes[key]) > axis:
            out.append((name, shapes[key][axis], key))
    kernels = [shapes[f"{conv}{i}.weight"][2] for i in range(layer_count(shapes, conv))
               if len(shapes.get(f"{conv}{i}.weight", ())) == 3]
    if kernels:
        out.append(("conv_kernel_sizes", ",".join(map(str, kernels)), conv + "*.weight"))
    return out


def _fail_field(path: Path, name: str, want: Any, why: str, got: Any, where: str = "") -> CheckpointError:
    where = f" ({where})" if where else ""
    return CheckpointError(f"{path}: field {name} expected {want!r} ({why}), got {got!r}{where}")


def _origin(args: dict[str, Any], name: str) -> str:
    return "model args" if name in args else "StreamSpeech's default, not in the model args"


def check_fixed_args(args: dict[str, Any], path: Path) -> None:
    """Settings EchoStream implements one way only, plus the chunk and subsampler kernels."""
    for name, want, why in FIXED_ARGS:
        got = model_arg(args, name)
        if got != want:
            raise _fail_field(path, name, want, why, got, _origin(args, name))
    chunk = model_arg(args, "chunk_size")
    if type(chunk) is not int or not 1 <= chunk < 999:
        raise _fail_field(path, "chunk_size", "1..998", "a simultaneous chunk model; >= 999 is "
                          "StreamSpeech's offline model", chunk, _origin(args, "chunk_size"))
    if str(model_arg(args, "conv_kernel_sizes")).replace(" ", "") != "5,5":
        raise _fail_field(path, "conv_kernel_sizes", "5,5", "the Conv1d subsampler's kernels",
                          model_arg(args, "conv_kernel_sizes"), _origin(args, "conv_kernel_sizes"))


def check_shape_fields(args: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Each architecture field of the args == the same field read off the state dict."""
    for name, got, where in shape_fields(shapes):
        want = model_arg(args, name)
        if name == "conv_kernel_sizes":
            want = str(want).replace(" ", "")
        if want != got:
            raise CheckpointError(f"{path}: field {name} expected {want!r} (model args), got {got!r} "
                                  f"(state dict {where})")
    st_layers = layer_count(shapes, "ctc_target_unigram_decoder.layers.")
    if st_layers:
        raise _fail_field(path, "ctc_target_unigram_decoder layers", 0, "a linear ST CTC head, "
                          "the streamspeech structure", st_layers, "ctc_target_unigram_decoder.layers.*")


def _vocab_sizes(shapes: dict[str, tuple[int, ...]], path: Path) -> dict[str, int]:
    """Vocabulary sizes from the output layers; the ST CTC and MT tables share one vocabulary."""
    keys = {"src": "source_unigram_decoder.proj.weight", "tgt": "ctc_target_unigram_decoder.proj.weight",
            "mt": "target_unigram_decoder.embed_tokens.weight", "units": "decoder.output_projection.weight"}
    missing = [k for k in keys.values() if k not in shapes]
    if missing:
        raise CheckpointError(f"{path}: state dict key {missing[0]} is missing (an output layer)")
    sizes = {name: shapes[key][0] for name, key in keys.items()}
    if sizes["mt"] != sizes["tgt"]:
        raise CheckpointError(f"{path}: target vocabulary expected {sizes['tgt']} ({keys['tgt']}), "
                              f"got {sizes['mt']} ({keys['mt']})")
    return sizes


def check_dictionaries(data: DataFolder, sizes: dict[str, int]) -> None:
    """Each dictionary of the data folder has as many symbols as its output layer has rows."""
    for path, size, key in ((data.src_dict, data.src_size, "source_unigram_decoder.proj.weight"),
                            (data.tgt_dict, data.tgt_size, "ctc_target_unigram_decoder.proj.weight")):
        want = sizes["src"] if key.startswith("source") else sizes["tgt"]
        if size != want:
            raise CheckpointError(f"{path}: dictionary size expected {want} (rows of {key}), got "
                                  f"{size} (4 specials + {size - 4} lines)")


def derive_config(ckpt: FairseqCheckpoint, shapes: dict[str, tuple[int, ...]], data: DataFolder,
                  vocoder_cfg=None) -> EchoStreamConfig:
    """The ``streamspeech`` preset's structure at the checkpoint's dims (see module docstring).

    Sentence capacity and vocoder windows stay at the preset's defaults; ``vocoder_cfg`` (from the
    vocoder's config.json) replaces the vocoder dims when given.
    """
    args, path = ckpt.model_args, ckpt.path
    check_fixed_args(args, path)
    check_int_args(args, path)
    check_shape_fields(args, shapes, path)
    sizes = _vocab_sizes(shapes, path)
    check_dictionaries(data, sizes)
    mt_ffn = shapes.get("target_unigram_decoder.layers.0.fc1.weight", (None,))[0]
    want_ffn = data.mt_decoder_args.get("decoder_ffn_embed_dim", 2048)
    if mt_ffn is not None and mt_ffn != want_ffn:
        raise CheckpointError(f"{data.multitask_yaml}: field target_unigram.decoder_args."
                              f"decoder_ffn_embed_dim expected {want_ffn}, got {mt_ffn} (state dict "
                              "target_unigram_decoder.layers.0.fc1.weight)")
    st_layers = data.st_decoder_args.get("encoder_layers", 0)
    if st_layers:  # the yaml builds a transformer ST CTC head; the state dict has a linear one
        raise CheckpointError(f"{data.multitask_yaml}: field ctc_target_unigram.decoder_args."
                              f"encoder_layers expected 0 (a linear ST CTC head, as the state dict "
                              f"holds), got {st_layers}")
    _check_units(ckpt, sizes["units"])
    return _build_config(args, sizes, mt_ffn or want_ffn, vocoder_cfg)


def _check_units(ckpt: FairseqCheckpoint, classes: int) -> None:
    code_size = ckpt.task_args.get("target_code_size") or ckpt.model_args.get("target_code_size")
    if code_size is not None and classes != int(code_size) + 5:
        raise CheckpointError(f"{ckpt.path}: unit classes expected {int(code_size) + 5} (4 specials + "
                              f"target_code_size {code_size} + blank), got {classes} "
                              "(decoder.output_projection.weight)")


INT_ARGS = ("input_feat_per_channel", "encoder_embed_dim", "encoder_layers", "encoder_attention_heads",
            "encoder_ffn_embed_dim", "conv_channels", "depthwise_conv_kernel_size",
            "translation_decoder_layers", "decoder_embed_dim", "decoder_attention_heads",
            "synthesizer_encoder_layers", "decoder_layers", "decoder_ffn_embed_dim", "ctc_upsample_rate")


def check_int_args(args: dict[str, Any], path: Path) -> None:
    """Every dim the config takes from the args is a positive int dividing as attention needs."""
    for name in INT_ARGS:
        value = model_arg(args, name)
        if type(value) is not int or value < 1:
            raise _fail_field(path, name, "a positive int", "a model dim", value, _origin(args, name))
    for dim, heads in (("encoder_embed_dim", "encoder_attention_heads"),
                       ("decoder_embed_dim", "decoder_attention_heads")):
        if model_arg(args, dim) % model_arg(args, heads):
            raise _fail_field(path, heads, f"a divisor of {dim} {model_arg(args, dim)}",
                              "attention heads split the width", model_arg(args, heads), _origin(args, heads))


def _build_config(args: dict[str, Any], sizes: dict[str, int], mt_ffn: int, vocoder_cfg) -> EchoStreamConfig:
    base = get_preset("streamspeech")
    arg = lambda name: model_arg(args, name)  # noqa: E731
    encoder = dataclasses.replace(
        base.encoder, input_dim=arg("input_feat_per_channel"), d_model=arg("encoder_embed_dim"),
        num_layers=arg("encoder_layers"), num_heads=arg("encoder_attention_heads"),
        ffn_dim=arg("encoder_ffn_embed_dim"), subsampling_channels=arg("conv_channels"),
        depthwise_kernel=arg("depthwise_conv_kernel_size"), chunk_size=arg("chunk_size"))
    d = arg("decoder_embed_dim")
    mt = dataclasses.replace(base.mt, num_layers=arg("translation_decoder_layers"), d_model=d,
                             num_heads=arg("decoder_attention_heads"), ffn_dim=mt_ffn)
    unit = dataclasses.replace(
        base.unit, t2u_layers=arg("synthesizer_encoder_layers"), num_layers=arg("decoder_layers"),
        d_model=d, num_heads=arg("decoder_attention_heads"), ffn_dim=arg("decoder_ffn_embed_dim"),
        upsample=arg("ctc_upsample_rate"), num_classes=sizes["units"], blank=sizes["units"] - 1)
    vocoder = vocoder_cfg or dataclasses.replace(base.vocoder, num_units=sizes["units"] - 5)
    cfg = dataclasses.replace(
        base, name="streamspeech", encoder=encoder, mt=mt, unit=unit, vocoder=vocoder,
        features=dataclasses.replace(base.features, num_mel_bins=arg("input_feat_per_channel")),
        ctc=dataclasses.replace(base.ctc, src_vocab_size=sizes["src"], tgt_vocab_size=sizes["tgt"]))
    return cfg


# ---- mapping plan (shapes only) --------------------------------------------------------------------


def expected_tensors(cfg: EchoStreamConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of ``EchoStreamModel(cfg)`` -> (shape, dtype), from a meta-device model (no
    memory is allocated, so the full-size check costs nothing)."""
    from echostream.models.echostream_model import EchoStreamModel

    with torch.device("meta"):
        model = EchoStreamModel(cfg)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _listing(kind: str, items: list[str]) -> str:
    more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
    return f"{kind} {', '.join(items[:3])}{more}"


def plan_mapping(shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                 source: str) -> tuple[dict[str, str], list[str]]:
    """Map every StreamSpeech key onto ``expected`` (EchoStream keys, vocoder excluded).

    Returns:
        (EchoStream key -> StreamSpeech key, the extra keys accounted for: version buffers,
        tied aliases, deprecated position buffers).
    Raises:
        CheckpointError naming missing keys (in StreamSpeech's names), unexpected keys and
        misshaped keys (expected vs got shape).
    """
    mapping, extras, unexpected, misshaped, seen = {}, [], [], [], set()
    for key, shape in shapes.items():
        if key in VERSION_BUFFERS or key in ALIASES or _DEPRECATED.fullmatch(key):
            extras.append(key)
            continue
        ours = to_echostream_key(key)
        if ours is None or ours not in expected:
            unexpected.append(f"{key} (shape {list(shape)}, expected no such key)")
            continue
        seen.add(ours)
        if tuple(shape) != expected[ours]:
            misshaped.append(f"{key} (shape expected {list(expected[ours])}, got {list(shape)})")
        else:
            mapping[ours] = key
    missing = [f"{to_streamspeech_key(k)} (expected shape {list(v)}, got no such key)"
               for k, v in expected.items() if k not in seen]
    problems = [_listing(kind, sorted(items)) for kind, items in
                (("missing key", missing), ("unexpected key", unexpected), ("misshaped key", misshaped))
                if items]
    if problems:
        raise CheckpointError(f"{source}: state dict does not fit the streamspeech structure: "
                              + "; ".join(problems))
    _check_alias_shapes(shapes, source)
    return mapping, sorted(extras)


def _check_alias_shapes(shapes: dict[str, tuple[int, ...]], source: str) -> None:
    for alias, key in ALIASES.items():
        if alias in shapes and tuple(shapes[alias]) != tuple(shapes.get(key, ())):
            raise CheckpointError(f"{source}: tied alias {alias}: shape expected "
                                  f"{list(shapes.get(key, ()))} (as {key}), got {list(shapes[alias])}")


# ---- reading tensors -------------------------------------------------------------------------------


def _cast(value: torch.Tensor, want: torch.dtype, key: str, source: str) -> torch.Tensor:
    """Source dtype -> the model's (fp16/bf16/fp64 -> fp32 for floats; integers -> int64)."""
    if want.is_floating_point and value.is_floating_point():
        return value.to(want)
    if not want.is_floating_point and not value.is_floating_point() and value.dtype != torch.bool:
        return value.to(want)
    raise CheckpointError(f"{source}: state dict key {key}: dtype expected {want}, got {value.dtype}")


def _check_aliases(state: dict[str, TensorRef], reader: TorchZipReader) -> None:
    """A tied alias must be the same memory as its key, or at least hold the same values."""
    for alias, key in ALIASES.items():
        if alias not in state or state[alias].same_view(state[key]):
            continue
        if not torch.equal(reader.tensor(state[alias]), reader.tensor(state[key])):
            raise CheckpointError(f"{reader.path}: tied alias {alias} expected the same tensor as "
                                  f"{key}, got different values")


def read_tensors(reader: TorchZipReader, state: dict[str, TensorRef], mapping: dict[str, str],
                 dtypes: dict[str, torch.dtype], progress: bool) -> dict[str, torch.Tensor]:
    """-> EchoStream key -> tensor in the model's dtype (read from the zip, cast)."""
    from tqdm import tqdm

    _check_aliases(state, reader)
    out = {}
    for ours, key in tqdm(mapping.items(), desc="import tensors", unit="tensor", file=sys.stderr,
                          disable=not progress, leave=False):
        out[ours] = _cast(reader.tensor(state[key]), dtypes[ours], key, str(reader.path))
    return out


# ---- the vocoder -----------------------------------------------------------------------------------


@dataclass
class VocoderSource:
    """``--vocoder G --vocoder-config JSON`` after reading (None fields: seeded vocoder).

    Examples:
        >>> with contextlib.ExitStack() as stack:                       # doctest: +SKIP
        ...     voc = open_vocoder("g_00500000", "config.json", VocoderConfig(), stack)
        ...     voc.config.upsample_rates, len(voc.state)
        ([5, 4, 4, 2, 2], 321)
    """

    checkpoint: Path | None = None
    config_path: Path | None = None
    config: Any = None
    reader: TorchZipReader | None = None
    state: dict[str, TensorRef] = field(default_factory=dict)


def open_vocoder(vocoder: str | Path | None, vocoder_config: str | Path | None,
                 preset_vocoder, stack: contextlib.ExitStack) -> VocoderSource:
    """Read the vocoder's config.json and pickle (no tensor data yet); the reader joins ``stack``."""
    if (vocoder is None) != (vocoder_config is None):
        raise CheckpointError("--vocoder and --vocoder-config go together (the weights and the "
                              "config.json they were trained with)")
    if vocoder is None:
        return VocoderSource()
    vcfg = read_vocoder_config(vocoder_config, preset_vocoder)
    reader = stack.enter_context(TorchZipReader(vocoder))
    return VocoderSource(Path(vocoder), Path(vocoder_config), vcfg, reader,
                         read_state_dict(reader, "generator"))


# ---- output folder ---------------------------------------------------------------------------------


def check_out(out: Path, force: bool) -> None:
    """An existing non-empty folder needs ``force``; a file in the way is refused."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"output folder {out} exists and is not empty; pass --force to replace it")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _copy_data_files(root: Path, data: DataFolder) -> dict[str, Any]:
    files = {SRC_DICT: data.src_dict, TGT_DICT: data.tgt_dict, CMVN: data.cmvn,
             SRC_SPM: data.src_spm, TGT_SPM: data.tgt_spm}
    record = {}
    for name, source in files.items():
        shutil.copyfile(source, root / name)
        record[name] = {"from": str(source.resolve()), "sha256": sha256(root / name)}
    return record


def _make_parents(path: Path) -> list[Path]:
    """mkdir the missing parents of ``path``; -> the ones created (deepest first), to undo."""
    created = []
    for parent in reversed(path.parents):
        if not parent.exists():
            parent.mkdir()
            created.insert(0, parent)
    return created


def write_folder(out: Path, force: bool, fill: Callable[[Path], None]) -> None:
    """Run ``fill(tmp)`` on a temporary folder beside ``out`` and rename it into place; on any
    failure nothing is left behind (and an existing ``out`` is untouched)."""
    from echostream.atomic import atomic_folder

    check_out(out, force)
    created = _make_parents(out)
    try:
        with atomic_folder(out) as tmp:
            fill(tmp)
    except BaseException:
        for parent in created:
            shutil.rmtree(parent, ignore_errors=True)
        raise


# ---- the whole import ------------------------------------------------------------------------------


@dataclass
class ImportSummary:
    """What an import did (``record`` is what ``import.json`` holds).

    Examples:
        >>> summary = import_streamspeech("ss.pt", data="fr-en", out="ckpt")   # doctest: +SKIP
        >>> summary.tensors, summary.parameters   # doctest: +SKIP
        (650, 70604768)
    """

    checkpoint: Path
    out: Path
    tensors: int
    parameters: int
    vocoder_parameters: int
    source_dtypes: list[str]
    vocoder: str
    seconds: float = 0.0
    record: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return (f"imported {self.checkpoint.name} -> {self.out}: {self.tensors} tensors, "
                f"{self.parameters:,} model + {self.vocoder_parameters:,} vocoder parameters "
                f"({'/'.join(self.source_dtypes)} -> float32), vocoder {self.vocoder}, "
                f"in {self.seconds:.1f} s")


def _source_dtypes(state: dict[str, TensorRef], keys) -> list[str]:
    return sorted({str(state[k].dtype).removeprefix("torch.") for k in keys})


def _provenance(ckpt: FairseqCheckpoint, data: DataFolder, voc: VocoderSource, extras: list[str],
                cfg: EchoStreamConfig) -> dict[str, Any]:
    from echostream import __version__

    used = sorted(set(ARG_DEFAULTS) | {"decoder_embed_dim", "decoder_ffn_embed_dim"})
    vocoder = ({"checkpoint": str(voc.checkpoint.resolve()), "sha256": sha256(voc.checkpoint),
                "config": str(voc.config_path.resolve()), "weight_norm": "removed"}
               if voc.checkpoint else {"seeded": True, "seed": cfg.seed})
    return {
        "format": "echostream-import", "format_version": 1, "echostream_version": __version__,
        "source": {"kind": "streamspeech", "checkpoint": str(ckpt.path.resolve()),
                   "sha256": sha256(ckpt.path), "cfg": ckpt.cfg_kind},
        "model_args": {k: model_arg(ckpt.model_args, k) for k in used},
        "model_args_given": sorted(k for k in used if k in ckpt.model_args),
        "data": {"folder": str(data.root.resolve()), "config_yaml": data.config_yaml.name,
                 "multitask_yaml": data.multitask_yaml.name},
        "extra_keys_dropped": extras, "vocoder": vocoder,
    }


def _fill(tmp: Path, model, cfg: EchoStreamConfig, data: DataFolder, record: dict[str, Any]) -> None:
    from echostream.models.weights import check_weights, read_weights, save_checkpoint

    weights = save_checkpoint(model, cfg, tmp)
    record["data"]["files"] = _copy_data_files(tmp, data)
    (tmp / IMPORT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    # Read back what `echostream export --checkpoint` will read (without building a second model).
    try:
        reread = EchoStreamConfig.load(tmp / "config.json")
        tensors = read_weights(weights)
        check_weights(model, tensors, source=f"weights in {weights}")
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"written checkpoint does not read back: {exc}") from None
    state = model.state_dict()
    if reread != cfg or any(not torch.equal(state[k], v) for k, v in tensors.items()):
        raise CheckpointError(f"written checkpoint {tmp} does not read back equal")


def _build(cfg: EchoStreamConfig, tensors: dict[str, torch.Tensor]):
    """Seeded model (the vocoder stays seeded where no vocoder was given), then our tensors."""
    from echostream.models.weights import build_model

    model = build_model(cfg)
    state = {k: v for k, v in model.state_dict().items() if k not in tensors}
    if any(not k.startswith(VOCODER_PREFIX) for k in state):
        missing = sorted(k for k in state if not k.startswith(VOCODER_PREFIX))
        raise CheckpointError(f"internal: no source for {missing[:3]}")
    model.load_state_dict({**state, **tensors}, strict=True)
    return model


def import_streamspeech(checkpoint: str | Path, *, data: str | Path, out: str | Path,
                        vocoder: str | Path | None = None, vocoder_config: str | Path | None = None,
                        force: bool = False, progress: bool = True,
                        log: Callable[[str], None] | None = None) -> ImportSummary:
    """Convert a StreamSpeech fairseq checkpoint into an EchoStream checkpoint folder ``out``.

    Raises:
        CheckpointError (an EchoStreamError, one line naming the file, key or field, expected and
        got) on any problem; nothing is written then.
    """
    start, log = time.monotonic(), log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    check_out(out, force)
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(TorchZipReader(checkpoint))
        ckpt = read_fairseq_checkpoint(reader)
        shapes = {k: tuple(v.shape) for k, v in ckpt.state.items()}
        folder = read_data_folder(data, ckpt.task_args, model_arg(ckpt.model_args, "input_feat_per_channel"))
        voc = open_vocoder(vocoder, vocoder_config, get_preset("streamspeech").vocoder, stack)
        return _convert(reader, ckpt, shapes, folder, voc, out, force, progress, log, start)


def language_notice(ckpt: FairseqCheckpoint, data: DataFolder) -> str | None:
    """A notice when the training data path names another language pair than the data folder's
    dictionaries (``.../fr-en/fbank2unit`` vs ``spm_unigram_es.txt``): every size check passes
    for a wrong folder (all vocabularies have 6000 pieces), so say it."""
    trained = re.search(r"(?:^|[/\\])([a-z]{2,3})-en(?:[/\\]|$)", str(ckpt.task_args.get("data") or ""))
    folder = re.fullmatch(r"spm_unigram_([a-z]{2,3})\.txt", data.src_dict.name)
    if trained and folder and trained.group(1) != folder.group(1):
        return (f"notice: {ckpt.path.name} was trained on {trained.group(1)}-en data "
                f"({ckpt.task_args['data']}) but {data.root} holds {folder.group(1)} dictionaries "
                f"({data.src_dict.name}); is --data the right folder?")
    return None


def _convert(reader, ckpt, shapes, folder, voc, out, force, progress, log, start) -> ImportSummary:
    cfg = derive_config(ckpt, shapes, folder, voc.config)
    notice = language_notice(ckpt, folder)
    if notice:
        log(notice)
    if voc.config is not None and cfg.vocoder.num_units != cfg.unit.num_classes - 5:
        raise CheckpointError(f"{voc.config_path}: field num_embeddings expected "
                              f"{cfg.unit.num_classes - 5} (the unit decoder's {cfg.unit.num_classes} "
                              f"classes - 4 specials - blank), got {cfg.vocoder.num_units}")
    try:
        expected = expected_tensors(cfg)
    except (ValueError, TypeError) as exc:  # a dim our modules refuse (an even kernel, ...)
        raise CheckpointError(f"{ckpt.path}: the architecture does not build: {exc}") from None
    model_shapes = {k: s for k, (s, _) in expected.items() if not k.startswith(VOCODER_PREFIX)}
    mapping, extras = plan_mapping(shapes, model_shapes, str(ckpt.path))
    vocoder_plan = None
    if voc.reader is not None:
        check_vocoder_dims(voc.state, cfg.vocoder, str(voc.checkpoint), str(voc.config_path))
        vocoder_shapes = {k[len(VOCODER_PREFIX):]: s for k, (s, _) in expected.items()
                          if k.startswith(VOCODER_PREFIX)}
        vocoder_plan = plan_vocoder(voc.state, vocoder_shapes, str(voc.checkpoint))
    dtypes = {k: d for k, (_, d) in expected.items()}
    tensors = read_tensors(reader, ckpt.state, mapping, dtypes, progress)
    if vocoder_plan is not None:
        tensors.update(materialise_vocoder(vocoder_plan, voc.reader))
    else:
        log(SEEDED_VOCODER_NOTICE)
    reader.release()  # the source bytes are not needed any more
    model = _build(cfg, tensors)
    del tensors
    record = _provenance(ckpt, folder, voc, extras, cfg)
    write_folder(out, force, lambda tmp: _fill(tmp, model, cfg, folder, record))
    n_voc = sum(p.numel() for p in model.vocoder.parameters())
    return ImportSummary(ckpt.path, out, len(mapping) + len(vocoder_plan or []),
                         sum(p.numel() for p in model.parameters()) - n_voc, n_voc,
                         _source_dtypes(ckpt.state, mapping.values()),
                         voc.checkpoint.name if voc.checkpoint else "seeded (noise)",
                         time.monotonic() - start, record)
