"""The moving average of trained weights: its update rule and swapping it in for evaluation."""

from __future__ import annotations

import torch

from mmalign.train.ema import EMA


def test_the_average_follows_the_decay_rule_and_is_swapped_in_only_inside_the_block():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([param], max_decay=0.9)
    expected = torch.zeros(3)
    for step in range(1, 30):
        with torch.no_grad():
            param.add_(1.0)
        ema.update(step)
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * param.detach()
    torch.testing.assert_close(ema.average[0], expected)
    trained = param.detach().clone()
    with ema.applied():
        torch.testing.assert_close(param.detach(), expected)
    torch.testing.assert_close(param.detach(), trained)
    assert ema.decay(1000) == 0.9 and ema.decay(0) == 0.1
