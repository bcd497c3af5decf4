"""SPEC step 3: prompt token ids and the class prompt embedding with the learned vectors in place.

Shared by the renderer (``generator.Regenerator``) and the builder's textual
inversion, so both put a class's vectors into exactly the same token slots.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

SLOT_TOKEN = "<d3m-slot-{}>"  # placeholder tokens shared by all classes (see encode_class_prompt)

_TEXT_LOCK = threading.Lock()


def slot_ids(pipe, n: int) -> list[int]:
    """Ids of the first ``n`` placeholder slot tokens, adding any that are missing."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    names = [SLOT_TOKEN.format(v) for v in range(n)]
    missing = [t for t in names if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing)
        enc.resize_token_embeddings(len(tok), mean_resizing=False)  # rows are overwritten before use
    return tok.convert_tokens_to_ids(names)


def token_ids(pipe, text: str) -> torch.Tensor:
    """``[1, L]`` ids padded to the tokenizer's maximum length (SPEC step 3)."""
    tok = pipe.tokenizer
    ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    return ids.to(pipe.text_encoder.device)


def placeholder_prompt(pipe, template: str, placeholder: str, n_vectors: int) -> tuple[torch.Tensor, list[int]]:
    """(``[1, L]`` ids of the template with ``n_vectors`` slot tokens, the slot ids)."""
    ids = slot_ids(pipe, n_vectors)
    slots = " ".join(SLOT_TOKEN.format(v) for v in range(n_vectors))
    return token_ids(pipe, template.replace(placeholder, slots)), ids


@torch.no_grad()
def encode_text(pipe, text: str) -> torch.Tensor:
    """``[1, L, D']`` text-encoder output for a plain prompt."""
    return pipe.text_encoder(token_ids(pipe, text))[0]


@torch.no_grad()
def encode_class_prompt(pipe, template: str, placeholder: str, vectors: np.ndarray) -> torch.Tensor:
    """The prompt embedding with the class's vectors in the placeholder slots.

    The slot tokens are added once to the shared tokenizer; their input rows are
    overwritten with this class's vectors just before encoding (under a lock),
    which is what loading a textual-inversion embedding and encoding the prompt
    does, without growing the vocabulary by one token per class.
    """
    with _TEXT_LOCK:
        ids, slots = placeholder_prompt(pipe, template, placeholder, len(vectors))
        table = pipe.text_encoder.get_input_embeddings().weight
        table[slots] = torch.as_tensor(np.asarray(vectors, dtype=np.float32)).to(table.device, table.dtype)
        return pipe.text_encoder(ids)[0].clone()
