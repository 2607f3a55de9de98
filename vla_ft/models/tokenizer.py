"""Instruction tokenizers: the backbone's own, or a byte-level one that needs no files.

Offline presets use ``transformers.ByT5Tokenizer()``: 256 byte ids + 3 specials + 125 extra ids
(vocabulary 384, which is why the native presets' embedding tables have 384 rows). It is saved
with every checkpoint (``save_pretrained``) and loaded back from there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoTokenizer, ByT5Tokenizer

from vla_ft.errors import CheckpointError

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")


def byte_tokenizer() -> ByT5Tokenizer:
    return ByT5Tokenizer()


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / f).is_file() for f in _TOKENIZER_FILES)


def read_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved in directory ``path``.

    Raises:
        CheckpointError: no tokenizer files there, or they do not load.
    """
    if not has_tokenizer(path):
        raise CheckpointError(
            f"{path}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); re-save the model"
        )
    # the class named in tokenizer_config.json wins over the model type's default (AutoTokenizer
    # picks by model_type first, e.g. a ByT5 tokenizer saved next to a LLaVA config fails otherwise)
    cfg_file = Path(path) / "tokenizer_config.json"
    try:
        name = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
    except (ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{cfg_file}: not a valid tokenizer config ({exc}); re-save the model"
        ) from None
    loader = getattr(transformers, name, None) if isinstance(name, str) else None
    loader = loader if loader is not None and hasattr(loader, "from_pretrained") else AutoTokenizer
    try:
        return loader.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: the tokenizer files do not load ({exc})") from None


def check_vocab(tokenizer: Any, vocab_size: int, where: str) -> None:
    """The tokenizer's ids must fit the embedding table."""
    if len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"{where}: tokenizer has {len(tokenizer)} tokens but the embedding table only {vocab_size}; "
            "use the backbone's own tokenizer"
        )
