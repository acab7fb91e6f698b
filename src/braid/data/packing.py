"""Packing documents into fixed-length training rows, vectorised with numpy.

The documents are laid end to end into one token stream; row b of a batch is the window
stream[b*T : b*T + T + 1], its inputs the first T tokens and its labels the last T. Rows
overlap by one token, so every token of the stream is a label exactly once (except where
masked), and the tokens after the batch (from b*T on) are carried to the next batch.

Names: B batch rows, T sequence length, S = T + 1 window, N tokens in the stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IGNORE_INDEX = -100


def pack_batch(
    pieces: Sequence[np.ndarray], batch_size: int, seq_len: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Pack `pieces` (each one document, or the tail of one) into a batch.

    Needs sum(len) >= batch_size * seq_len + 1. Returns ({"input_ids": (B,T) int64,
    "labels": (B,T) int64, "doc_ids": (B,T) int32}, the unused tail (>= 1 token)).
    labels[b, t] is the next token, or -100 where it belongs to another piece. doc_ids
    number the pieces within each row from 0, so they are equal exactly within a piece.
    """
    B, T = batch_size, seq_len
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    if lengths.sum() < B * T + 1:
        raise ValueError(f"need {B * T + 1} tokens to pack a {B}x{T} batch, got {int(lengths.sum())}")
    tokens_N = np.concatenate(pieces).astype(np.int64, copy=False)
    doc_N = np.repeat(np.arange(len(pieces), dtype=np.int64), lengths)
    window_BS = np.arange(B, dtype=np.int64)[:, None] * T + np.arange(T + 1, dtype=np.int64)
    tokens_BS, doc_BS = tokens_N[window_BS], doc_N[window_BS]
    same_doc_BT = doc_BS[:, 1:] == doc_BS[:, :-1]
    batch = {
        "input_ids": tokens_BS[:, :-1],
        "labels": np.where(same_doc_BT, tokens_BS[:, 1:], IGNORE_INDEX),
        "doc_ids": (doc_BS[:, :-1] - doc_BS[:, :1]).astype(np.int32),
    }
    return batch, tokens_N[B * T:]
