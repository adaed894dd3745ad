"""A test strategy whose ``on_stop`` blocks its actor's loop (a callback
stuck in a blocking call): only the shutdown deadline ends it."""
from __future__ import annotations

import time

from piker.bot import Strategy, StrategyContext, StrategyParams


class HangOnStop(Strategy):

    class Params(StrategyParams):
        hang_secs: float = 60.0

    params: Params

    def on_stop(self, ctx: StrategyContext) -> None:
        time.sleep(self.params.hang_secs)
