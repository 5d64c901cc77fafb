"""Argument checks shared by the quantized layers."""

from __future__ import annotations


def check_features(owner: str, in_features: int, out_features: int) -> None:
    """A quantized layer's weight has at least one element (its ops refuse empty weights,
    which nn.Linear allows): ValueError naming the features otherwise."""
    if in_features <= 0 or out_features <= 0:
        raise ValueError(
            f"{owner}: in_features and out_features must be positive (a quantized weight has "
            f"at least one element), got in_features={in_features}, "
            f"out_features={out_features}"
        )
