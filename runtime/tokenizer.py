"""Tokenisation with ``tokenizers``, configured exactly as transformers' fast tokenizer would be.

diffusers calls ``tokenizer(texts, padding="longest", truncation=True, max_length=N)``; a fast tokenizer
turns that into ``enable_truncation(N, direction=truncation_side)`` and
``enable_padding(direction=padding_side, pad_id, pad_token)`` on the backend, then ``encode_batch`` with
special tokens. We read the same settings from the checkpoint's ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ArtifactError, InputError


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


@dataclass
class Encoded:
    input_ids: np.ndarray  # [B, S] int64
    attention_mask: np.ndarray  # [B, S] bool


class TextTokenizer:
    """Byte-level BPE tokenizer of the checkpoint, with its padding side, pad token and truncation side."""

    def __init__(self, tokenizer_dir: str | Path):
        from tokenizers import Tokenizer

        tokenizer_dir = Path(tokenizer_dir)
        try:
            self._tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
            config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ArtifactError(
                f"tokenizer files in {tokenizer_dir} cannot be read ({exc}).",
                "re-run `acestep-trt export` to copy the checkpoint's tokenizer again.",
            ) from None
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        self.pad_token = _token_content(config.get("pad_token"))
        self.pad_token_id = self._tok.token_to_id(self.pad_token) if self.pad_token else None

    def __call__(self, texts: list[str], max_length: int) -> Encoded:
        """``padding="longest", truncation=True, max_length=max_length`` as transformers does it."""
        tok = self._tok
        tok.no_padding()
        tok.enable_truncation(max_length, stride=0, strategy="longest_first", direction=self.truncation_side)
        if len(texts) > 1:
            if self.pad_token_id is None:
                raise InputError(
                    "the checkpoint's tokenizer has no pad token, so prompts cannot be batched.",
                    "generate one prompt at a time.",
                )
            tok.enable_padding(direction=self.padding_side, pad_id=self.pad_token_id, pad_token=self.pad_token)
        encodings = tok.encode_batch(texts, add_special_tokens=True)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=bool)
        return Encoded(ids, mask)
