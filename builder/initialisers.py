"""Where a class token starts: the class's own name, read by the model's tokenizer.

A class name is often not one token: ImageNet's are WordNet lines such as
"tench, Tinca tinca" or "great white shark, white shark, man-eater, ...", and
with the real CLIP tokenizer ~75 % of ImageNet's short names are several
tokens. The initialiser therefore reads the name, not a generic word:

1. the *head name*: the text before the first comma (WordNet lists the common
   name first, synonyms and the Latin binomial after it);
2. its words (split at white space); a word's vector is the mean of its
   tokens' input embeddings (a word the tokenizer does not know becomes its
   sub-word pieces, averaged);
3. one vector (``n_vectors`` 1): the mean of the word vectors, every word
   counting once however many pieces it has; ``n_vectors`` k > 1: the words in
   k contiguous groups, one group's mean per slot (with fewer words than slots,
   the extra slots take the mean of all words).

So ``--ti-steps 0`` renders the class's name (with one slot per word, exactly
its words), and the learned token starts from it. Only a name with no
tokenizable text at all falls back to ``generic_word``.
"""

from __future__ import annotations

import numpy as np
import torch


def head_name(class_name: str) -> str:
    """The name before the first comma (WordNet's head word), stripped; the whole name if that is empty."""
    head = class_name.split(",", 1)[0].strip()
    return head or class_name.strip()


def word_vectors(pipe, words: list[str]) -> tuple[list[torch.Tensor], list[str]]:
    """(mean input embedding of each word's tokens, the words that have tokens)."""
    tok, table = pipe.tokenizer, pipe.text_encoder.get_input_embeddings().weight.detach()
    vectors, kept = [], []
    for word in words:
        ids = tok(word, add_special_tokens=False).input_ids
        if ids:
            vectors.append(table[ids].float().mean(dim=0))
            kept.append(word)
    return vectors, kept


def initial_vectors(pipe, class_name: str, n_vectors: int, generic_word: str) -> tuple[torch.Tensor, list[str]]:
    """The ``[n_vectors, D]`` float32 initialiser for ``class_name`` and the words it was made from.

    Example:
        >>> vectors, words = initial_vectors(pipe, "tench, Tinca tinca", 1, "object")  # doctest: +SKIP
        >>> words                                                                     # doctest: +SKIP
        ['tench']
    """
    vectors, words = word_vectors(pipe, head_name(class_name).split())
    if not vectors:
        vectors, words = word_vectors(pipe, generic_word.split())
    stack = torch.stack(vectors)
    if n_vectors == 1:
        return stack.mean(dim=0, keepdim=True), words
    groups = [g for g in np.array_split(np.arange(len(stack)), n_vectors) if len(g)]
    slots = [stack[torch.as_tensor(g)].mean(dim=0) for g in groups]
    slots += [stack.mean(dim=0)] * (n_vectors - len(slots))
    return torch.stack(slots), words


def mean_token_norm(pipe) -> float:
    """The mean L2 norm of the vocabulary's input embeddings (the scale a learned vector is compared with).

    Only the tokenizer's own vocabulary counts, not the slot tokens added for the learned vectors.
    """
    table = pipe.text_encoder.get_input_embeddings().weight.detach().float()
    return float(table[: pipe.tokenizer.vocab_size].norm(dim=1).mean())
