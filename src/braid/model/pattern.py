"""The layer pattern: a compact string that says which mixer and FFN each block has.

Grammar (whitespace and '|' separate tokens and are otherwise ignored):

    pattern := token+
    token   := mixer [ffn] | ffn
    mixer   := 'M'            Mamba-2 (SSD)
             | 'G'            gated linear attention
             | 'A' | '*'      full causal attention ('*' is Megatron's symbol)
             | 'S' [digits]   sliding-window attention; digits give this layer's window,
                              none means attention.window
    ffn     := '-'            dense SwiGLU MLP (Megatron's symbol)
             | 'E'            mixture of experts (Megatron's symbol)
             | 'F'            MatFormer nested FFN

A block is a mixer with the FFN right after it, or either alone; both sublayers are
pre-norm residual, so Megatron's one-sublayer-per-symbol stacks parse unchanged and
compute the same function. The token list is tiled (cycled) to `num_layers` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import cycle, islice

MIXER_SYMBOLS = {"M": "mamba2", "G": "gla", "A": "attention", "*": "attention", "S": "sliding"}
FFN_SYMBOLS = {"-": "mlp", "E": "moe", "F": "matformer"}
MIXER_KINDS = ("mamba2", "gla", "attention", "sliding")
FFN_KINDS = ("mlp", "moe", "matformer")
SEPARATORS = " \t\n|"


@dataclass(frozen=True)
class LayerSpec:
    """One block: its index, mixer kind (or None), window for 'sliding', FFN kind (or None)."""

    index: int
    mixer: str | None
    ffn: str | None
    window: int | None = None  # None for 'sliding' means attention.window

    @property
    def symbol(self) -> str:
        mixer = {"mamba2": "M", "gla": "G", "attention": "A", "sliding": "S", None: ""}[self.mixer]
        if self.mixer == "sliding" and self.window is not None:
            mixer += str(self.window)
        ffn = {"mlp": "-", "moe": "E", "matformer": "F", None: ""}[self.ffn]
        return mixer + ffn


def _tokenize(pattern: str) -> list[tuple[str | None, int | None, str | None]]:
    tokens: list[tuple[str | None, int | None, str | None]] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch in SEPARATORS:
            i += 1
            continue
        mixer = window = ffn = None
        if ch in MIXER_SYMBOLS:
            mixer = MIXER_SYMBOLS[ch]
            i += 1
            if mixer == "sliding":
                j = i
                while j < n and pattern[j].isdigit():
                    j += 1
                if j > i:
                    window = int(pattern[i:j])
                    if window <= 0:
                        raise ValueError(f"layer pattern {pattern!r}: window at position {i} must be positive")
                i = j
            elif i < n and pattern[i].isdigit():
                raise ValueError(
                    f"layer pattern {pattern!r}: a window size (digits at position {i}) may only "
                    "follow 'S' (sliding-window attention)"
                )
        if i < n and pattern[i] in FFN_SYMBOLS:
            ffn = FFN_SYMBOLS[pattern[i]]
            i += 1
        if mixer is None and ffn is None:
            valid = "".join(MIXER_SYMBOLS) + "".join(FFN_SYMBOLS)
            raise ValueError(
                f"layer pattern {pattern!r}: unknown symbol {pattern[i]!r} at position {i}; "
                f"valid symbols are {' '.join(valid)} (see docs/model.md)"
            )
        tokens.append((mixer, window, ffn))
    return tokens


def parse_pattern(pattern: str, num_layers: int | None = None) -> list[LayerSpec]:
    """Parse `pattern` and tile it to `num_layers` blocks (None: the pattern's own length)."""
    tokens = _tokenize(pattern)
    if not tokens:
        raise ValueError("layer pattern is empty: give at least one mixer or FFN symbol, e.g. 'M-A-'")
    if num_layers is None:
        num_layers = len(tokens)
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if len(tokens) > num_layers:
        raise ValueError(
            f"layer pattern {pattern!r} has {len(tokens)} blocks but num_layers={num_layers}; "
            "shorten the pattern or raise num_layers (or set num_layers=None to use the pattern's length)"
        )
    return [
        LayerSpec(index=i, mixer=m, ffn=f, window=w)
        for i, (m, w, f) in enumerate(islice(cycle(tokens), num_layers))
    ]


def format_pattern(layers: list[LayerSpec]) -> str:
    """The explicit, untiled pattern of a parsed stack (tokens separated by spaces)."""
    return " ".join(spec.symbol for spec in layers)
