"""Masked-LM inputs: choose positions, then 80% [MASK], 10% a random token, 10% unchanged.

inputs, labels = mask_batch(ids, special, mask_id, vocab_size, 0.15, generator)
"""

from __future__ import annotations

import torch

IGNORE = -100  # label of a position the loss skips


def mask_batch(
    ids: torch.Tensor,
    special: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    prob: float,
    generator: torch.Generator,
    word_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` for a padded batch ``ids`` ([rows, length]).

    ``special`` marks positions never masked ([CLS], [SEP], padding). Each other position is chosen
    with probability ``prob``; with ``word_ids`` (word index per position) whole words are chosen
    together. Every row gets at least one chosen position: search queries are short, and a row
    without one would teach nothing. Labels are the original ids at chosen positions, -100 elsewhere.
    """
    rows, length = ids.shape
    if word_ids is None:
        chosen = torch.rand(rows, length, generator=generator) < prob
    else:
        word_draw = torch.rand(rows, length, generator=generator) < prob
        chosen = word_draw.gather(1, word_ids.clamp(min=0))
    chosen &= ~special
    fallback = torch.rand(rows, length, generator=generator).masked_fill(special, -1.0).argmax(dim=1, keepdim=True)
    empty = ~chosen.any(dim=1, keepdim=True)
    if word_ids is None:
        picked = torch.zeros_like(chosen).scatter(1, fallback, True)
    else:
        picked = word_ids == word_ids.gather(1, fallback)
    chosen |= empty & picked & ~special
    labels = ids.masked_fill(~chosen, IGNORE)
    how = torch.rand(rows, length, generator=generator)
    random_ids = torch.randint(vocab_size, (rows, length), generator=generator)
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
    return inputs, labels
