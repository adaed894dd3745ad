"""Bench-only: a market order on every bar close, for the bar-close -> broker latency.

Params:
    size (float, default 1.0)  size of each order; orders alternate buy/sell so
                               the position stays within +-size

The bar close is the boundary the samplerd increment marks (the just-closed
bar's open time + the timeframe). ``on_bar`` notes that boundary and its own
wall time per order; the note is logged as ``bench.sample`` (at warning level,
so it is kept at any log_level) only when the order's fill comes back, so
logging adds nothing to the measured path.
bench/bench_bot.py joins it with paperboi's receive time from the ledger.
"""
from __future__ import annotations

import time

import numpy as np

from piker.bot import Strategy, StrategyContext, StrategyParams
from piker.clearing import BrokerdFill


class EveryBar(Strategy):

    class Params(StrategyParams):
        size: float = 1.0

    params: Params

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        self._long: dict[str, bool] = {}
        # oid -> (bar close epoch ns, on_bar wall ns)
        self._pending: dict[str, tuple[int, int]] = {}

    def on_bar(self, ctx: StrategyContext, fqme: str, bars: np.ndarray) -> None:
        on_bar_ns = time.time_ns()
        close_ns = (int(bars['time'][-1]) + ctx.timeframe_secs) * 1_000_000_000
        long = self._long.get(fqme, False)
        if long:
            oid = ctx.sell(fqme, self.params.size)
        else:
            oid = ctx.buy(fqme, self.params.size)
        self._long[fqme] = not long
        self._pending[oid] = (close_ns, on_bar_ns)

    def on_fill(self, ctx: StrategyContext, fill: BrokerdFill) -> None:
        noted = self._pending.pop(fill.oid, None)
        if noted is not None:
            # warning: the sample must survive a tree run at log_level 'warning'
            ctx.log.warning('bench.sample', oid=fill.oid, fqme=fill.fqme,
                         bar_close_ns=noted[0], on_bar_ns=noted[1])
