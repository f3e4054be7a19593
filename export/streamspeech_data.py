"""StreamSpeech's data folder (``configs/<lang>-en/`` as the authors ship it), read for an import.

The folder holds ``config_gcmvn.yaml`` (``global_cmvn.stats_npz_path``), the multitask
``config_mtl_asr_st_ctcst.yaml`` (one entry per auxiliary task: ``source_unigram`` = ASR CTC,
``ctc_target_unigram`` = ST CTC, ``target_unigram`` = the MT decoder, each with its ``dict``),
``gcmvn.npz`` and the SentencePiece models + fairseq dictionaries (``src_unigram6000/``,
``tgt_unigram6000/``). The yaml files hold absolute paths of the authors' machine, so every path
is resolved by name inside the folder: the shortest tail of the written path that exists there
(``.../fr-en/src_unigram6000/spm_unigram_fr.txt`` -> ``src_unigram6000/spm_unigram_fr.txt``).

Examples:
    >>> data = read_data_folder("../shared/streamspeech/configs/fr-en", {})   # doctest: +SKIP
    >>> data.src_dict.name, data.src_size, data.tgt_size   # doctest: +SKIP
    ('spm_unigram_fr.txt', 6000, 6000)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from echostream.errors import ArtifactError
from echostream.export.fairseq_checkpoint import CheckpointError

DEFAULT_CONFIG_YAML = "config_gcmvn.yaml"
DEFAULT_MULTITASK_YAML = "config_mtl_asr_st_ctcst.yaml"
ASR_TASK, ST_TASK, MT_TASK = "source_unigram", "ctc_target_unigram", "target_unigram"


@dataclass(frozen=True)
class DataFolder:
    """The files of a StreamSpeech data folder an import needs, resolved and checked.

    Attributes:
        root: the folder.
        config_yaml / multitask_yaml: the two yaml files read.
        src_dict / tgt_dict: fairseq dictionaries of the source (ASR CTC) and target (ST CTC, MT).
        src_spm / tgt_spm: the SentencePiece models beside them (same name, ``.model``).
        cmvn: ``gcmvn.npz`` (``mean``/``std`` ``[input_dim]``).
        src_size / tgt_size: dictionary sizes with fairseq's 4 specials (``4 + lines``).
        mt_decoder_args / st_decoder_args: the ``decoder_args`` of the MT and ST CTC tasks.

    Examples:
        >>> data = read_data_folder("configs/fr-en", {"config_yaml": "config_gcmvn.yaml"})  # doctest: +SKIP
        >>> data.tgt_dict.relative_to(data.root), data.tgt_size   # doctest: +SKIP
        (PosixPath('tgt_unigram6000/spm_unigram_fr.txt'), 6000)
    """

    root: Path
    config_yaml: Path
    multitask_yaml: Path
    src_dict: Path
    tgt_dict: Path
    src_spm: Path
    tgt_spm: Path
    cmvn: Path
    src_size: int
    tgt_size: int
    mt_decoder_args: dict[str, Any]
    st_decoder_args: dict[str, Any]


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise CheckpointError(f"{path}: file not found in the data folder")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a YAML mapping, got {type(data).__name__}")
    return data


def resolve_in_folder(root: Path, written: Any, what: str, source: Path) -> Path:
    """The file ``written`` (an absolute path of another machine) names, found inside ``root``.

    Tries the path's tails from the file name up (``name``, ``parent/name``, ...) and returns the
    first that exists under ``root``.
    """
    if not isinstance(written, str) or not written.strip():
        raise CheckpointError(f"{source}: {what} expected a file path, got {written!r}")
    parts = (PureWindowsPath(written) if "\\" in written else PurePosixPath(written)).parts
    parts = [p for p in parts if p not in ("/", "\\") and not p.endswith(":\\")]
    for k in range(1, len(parts) + 1):
        if ".." in parts[-k:]:  # never leave the folder
            break
        candidate = root.joinpath(*parts[-k:])
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{source}: {what} {written!r}: no file of that name inside {root}")


def _task(multitask: dict[str, Any], name: str, decoder_type: str, path: Path) -> dict[str, Any]:
    entry = multitask.get(name)
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: task {name!r} expected (tasks: {sorted(multitask)}), got none")
    if entry.get("decoder_type") != decoder_type:
        raise CheckpointError(f"{path}: {name}.decoder_type expected {decoder_type!r}, "
                              f"got {entry.get('decoder_type')!r}")
    return entry


def dictionary_size(path: Path) -> int:
    """Symbols of a fairseq dictionary file including the 4 implicit specials."""
    from echostream.runtime.artifacts import load_fairseq_dict

    try:
        return len(load_fairseq_dict(path))
    except (UnicodeDecodeError, ArtifactError, OSError) as exc:
        raise CheckpointError(f"{path}: not a fairseq dictionary ({exc})") from None


def _spm_beside(dict_path: Path) -> Path:
    model = dict_path.with_suffix(".model")
    if not model.is_file():
        raise CheckpointError(f"{dict_path}: SentencePiece model {model.name} expected beside it, "
                              "got none")
    return model


def check_cmvn(path: Path, dim: int) -> None:
    """``gcmvn.npz`` must hold finite ``mean`` and positive ``std``, both ``[dim]``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            stats = {k: np.asarray(data[k]) for k in ("mean", "std")}
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot read global CMVN mean/std ({exc})") from None
    for key, arr in stats.items():
        if arr.shape != (dim,):
            raise CheckpointError(f"{path}: {key} shape expected [{dim}], got {list(arr.shape)}")
        if not np.all(np.isfinite(arr)):
            raise CheckpointError(f"{path}: {key} has non-finite values")
    if not np.all(stats["std"] > 0):
        raise CheckpointError(f"{path}: std expected > 0 everywhere, got min {stats['std'].min()}")


def _yaml_name(task_args: dict[str, Any], key: str, default: str) -> str:
    """The yaml file the training task named (its base name), else StreamSpeech's default."""
    value = task_args.get(key)
    return PurePosixPath(str(value).replace("\\", "/")).name if value else default


def read_data_folder(root: str | Path, task_args: dict[str, Any], input_dim: int = 80) -> DataFolder:
    """Resolve and check the dictionaries, SentencePiece models and CMVN of a data folder.

    Args:
        root: the folder (``configs/<lang>-en``).
        task_args: the checkpoint's task settings (``config_yaml`` / ``multitask_config_yaml``
            name the yaml files; StreamSpeech's names otherwise).
        input_dim: fbank bins the CMVN statistics must have.
    """
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"{root}: data folder not found")
    config_yaml = root / _yaml_name(task_args, "config_yaml", DEFAULT_CONFIG_YAML)
    multitask_yaml = root / _yaml_name(task_args, "multitask_config_yaml", DEFAULT_MULTITASK_YAML)
    config, multitask = _load_yaml(config_yaml), _load_yaml(multitask_yaml)
    cmvn_entry = config.get("global_cmvn") if isinstance(config.get("global_cmvn"), dict) else {}
    cmvn = resolve_in_folder(root, cmvn_entry.get("stats_npz_path"), "global_cmvn.stats_npz_path",
                             config_yaml)
    check_cmvn(cmvn, input_dim)
    asr = _task(multitask, ASR_TASK, "ctc", multitask_yaml)
    st = _task(multitask, ST_TASK, "ctc", multitask_yaml)
    mt = _task(multitask, MT_TASK, "transformer", multitask_yaml)
    src = resolve_in_folder(root, asr.get("dict"), f"{ASR_TASK}.dict", multitask_yaml)
    tgt = resolve_in_folder(root, mt.get("dict"), f"{MT_TASK}.dict", multitask_yaml)
    st_dict = resolve_in_folder(root, st.get("dict"), f"{ST_TASK}.dict", multitask_yaml)
    if st_dict.read_bytes() != tgt.read_bytes():  # one target vocabulary for ST CTC and MT
        raise CheckpointError(f"{multitask_yaml}: {ST_TASK}.dict expected the same dictionary as "
                              f"{MT_TASK}.dict ({tgt.relative_to(root)}), got {st_dict.relative_to(root)}")
    return DataFolder(root, config_yaml, multitask_yaml, src, tgt, _spm_beside(src), _spm_beside(tgt),
                      cmvn, dictionary_size(src), dictionary_size(tgt),
                      dict(mt.get("decoder_args") or {}), dict(st.get("decoder_args") or {}))
