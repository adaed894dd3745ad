"""A test strategy that raises in ``on_start``: it never trades."""
from __future__ import annotations

from piker.bot import Strategy, StrategyContext


class FailOnStart(Strategy):

    def on_start(self, ctx: StrategyContext) -> None:
        raise KeyError('no such account setting: the strategy cannot start')
