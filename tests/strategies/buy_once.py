"""A test strategy: one market buy when it starts, nothing else."""
from __future__ import annotations

from piker.bot import Strategy, StrategyContext, StrategyParams


class BuyOnce(Strategy):

    class Params(StrategyParams):
        size: float = 1.0

    params: Params

    def on_start(self, ctx: StrategyContext) -> None:
        for fqme in ctx.markets:
            ctx.buy(fqme, self.params.size)
