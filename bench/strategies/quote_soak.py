"""Bench-only: consume every quote of many markets, trade now and then (soak).

Params:
    report_secs (float, default 30)      how often ``bench.quotes`` is logged (quotes
                                         since the last report and their rate)
    trade_every_secs (float, default 10) a market order on the first market this
                                         often, alternating buy/sell (0: never trade)
    size (float, default 1.0)            size of those orders

The per-quote work is deliberately small (a count and the last mid per
market), so the soak measures the runtime's memory, not the strategy's.
Timers run off quotes, so the bar timeframe can be anything.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from piker.bot import Strategy, StrategyContext, StrategyParams


class QuoteSoak(Strategy):

    class Params(StrategyParams):
        report_secs: float = 30.0
        trade_every_secs: float = 10.0
        size: float = 1.0

    params: Params

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self.quotes = 0
        self.total_quotes = 0
        self.bars = 0
        self.long = False
        self.mids: dict[str, float] = {}
        self.last_close: dict[str, float] = {}
        now = time.monotonic()
        self._reported = self._traded = now

    def on_quote(self, ctx: StrategyContext, fqme: str, quote: Any) -> None:
        self.quotes += 1
        bid, ask = quote.get('bid'), quote.get('ask')
        if bid and ask:
            self.mids[fqme] = (bid + ask) / 2
        now = time.monotonic()
        if now - self._reported >= self.params.report_secs:
            self._report(ctx, now)
        every = self.params.trade_every_secs
        if every and now - self._traded >= every:
            self._traded = now
            first = ctx.markets[0]
            if self.long:
                ctx.sell(first, self.params.size)
            else:
                ctx.buy(first, self.params.size)
            self.long = not self.long

    def on_bar(self, ctx: StrategyContext, fqme: str, bars: np.ndarray) -> None:
        self.bars += 1
        self.last_close[fqme] = float(bars['close'][-1])

    def _report(self, ctx: StrategyContext, now: float) -> None:
        secs = now - self._reported
        self.total_quotes += self.quotes
        ctx.log.info('bench.quotes', quotes=self.quotes, secs=round(secs, 3),
                     quotes_per_sec=round(self.quotes / secs, 1), total=self.total_quotes,
                     bars=self.bars, markets=len(self.mids))
        self.quotes = 0
        self._reported = now
