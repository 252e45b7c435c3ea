"""Prompt tokenization in a bundle with the `tokenizers` library (no transformers, no torch).

Reads the bundle's tokenizer/tokenizer.json (written at export from the pipeline's own tokenizer)
and pads/truncates to the text encoder's sequence length the way diffusers' pipelines call the
transformers tokenizer (padding="max_length", truncation=True: bos/eos count toward the length).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgediff.errors import BadInput, Unavailable


class BundleTokenizer:
    def __init__(self, path: Path, max_length: int, pad_token_id: int) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise Unavailable("tokenizing prompts needs the tokenizers library: pip install tokenizers") from None
        path = Path(path)
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises its own exception types
            raise BadInput(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]})") from None
        pad_token = self.tok.id_to_token(int(pad_token_id))
        cfg = path.parent / "tokenizer_config.json"
        if cfg.is_file():
            try:
                pad_token = json.loads(cfg.read_text()).get("pad_token") or pad_token
            except json.JSONDecodeError:
                raise BadInput(f"{cfg}: not valid JSON") from None
            if isinstance(pad_token, dict):  # older configs store AddedToken objects
                pad_token = pad_token.get("content")
        self.max_length = int(max_length)
        self.tok.enable_truncation(max_length=self.max_length)
        self.tok.enable_padding(length=self.max_length, pad_id=int(pad_token_id), pad_token=str(pad_token))

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """(N, max_length) int64 token ids."""
        return self.encode(prompts)[0]

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """((N, max_length) int64 token ids, their attention mask: 1 for tokens, 0 for padding)."""
        enc = self.tok.encode_batch([str(p) for p in prompts])
        return (np.asarray([e.ids for e in enc], dtype=np.int64),
                np.asarray([e.attention_mask for e in enc], dtype=np.int64))
