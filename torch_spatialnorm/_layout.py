"""The output layout rule of every kernel: like the input, as empty_like lays it out."""

import torch


def laid_out_like(input: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """``result`` copied into ``torch.empty_like(input)`` unless it already has that layout."""
    output = torch.empty_like(input)
    if output.stride() == result.stride():
        return result
    output.copy_(result)
    return output
