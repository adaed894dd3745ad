"""A test strategy that raises in ``on_bar`` once it has seen ``fail_at`` bars
(and buys one lot before that, so the on_error policy has an order to handle)."""
from __future__ import annotations

import numpy as np

from piker.bot import Strategy, StrategyContext, StrategyParams


class Boom(Strategy):

    class Params(StrategyParams):
        fail_at: int = 2
        limit: float = 1.0

    params: Params

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.bars_seen = 0

    def on_bar(self, ctx: StrategyContext, fqme: str, bars: np.ndarray) -> None:
        self.bars_seen += 1
        if self.bars_seen == 1:
            # a resting buy far below the market: on_error='cancel' must pull it
            ctx.buy(fqme, 1, limit=self.params.limit)
        if self.bars_seen >= self.params.fail_at:
            raise ZeroDivisionError('boom: the strategy divided by zero')
