"""Bollinger-band mean reversion with resting limit orders.

Params (``params`` of the ``[[strategies]]`` entry in bot.toml):
    lookback (int, default 20)    closes in the rolling mean and standard deviation
    entry_z (float, default 2.0)  entry bands: mean -/+ entry_z * std
    exit_z (float, default 0.0)   exit price: mean +/- exit_z * std (0 = at the mean)
    size (float, default 1.0)     size of each entry
    tick (float, default 0.01)    price increment: buys round down, sells round up

When flat it rests a limit buy at the lower band and a limit sell at the upper
band; when long (short) it rests one limit order that exits at the mean. Orders
are re-quoted on every closed bar (cancel, then place at the new bands). When an
entry fills, the other side is pulled at once and the exit is placed at the
last bar's mean, so both entries can never be filled together by one bar.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from piker.bot import Strategy, StrategyContext, StrategyParams

if TYPE_CHECKING:
    from piker.clearing import BrokerdFill


class MeanRevert(Strategy):

    class Params(StrategyParams):
        lookback: int = 20
        entry_z: float = 2.0
        exit_z: float = 0.0
        size: float = 1.0
        tick: float = 0.01

        def __post_init__(self) -> None:
            if self.lookback < 2:
                raise ValueError(f'expected `lookback` >= 2, got {self.lookback}')
            if not self.entry_z > self.exit_z >= 0:
                raise ValueError(
                    f'expected `entry_z` > `exit_z` >= 0, got entry_z={self.entry_z} '
                    f'exit_z={self.exit_z}'
                )
            if self.size <= 0 or self.tick <= 0:
                raise ValueError(
                    f'expected `size` > 0 and `tick` > 0, got size={self.size} tick={self.tick}'
                )

    params: Params

    def __init__(self, params: Params | None = None) -> None:
        super().__init__(params)
        # last (mean, std) per market, for placing exits between bars
        self._bands: dict[str, tuple[float, float]] = {}

    def on_bar(self, ctx: StrategyContext, fqme: str, bars: np.ndarray) -> None:
        p = self.params
        if len(bars) < p.lookback:
            return
        closes = bars['close'][-p.lookback:]
        mean, std = float(closes.mean()), float(closes.std())
        self._bands[fqme] = (mean, std)
        self._requote(ctx, fqme)

    def on_fill(self, ctx: StrategyContext, fill: BrokerdFill) -> None:
        if fill.fqme in self._bands:
            self._requote(ctx, fill.fqme)

    def _requote(self, ctx: StrategyContext, fqme: str) -> None:
        p = self.params
        mean, std = self._bands[fqme]
        for order in ctx.open_orders(fqme):
            ctx.cancel(order.oid)
        if std == 0.0 or mean <= 0.0:  # no spread to trade, or a nonsense series
            return
        pos = ctx.position(fqme)
        if pos == 0.0:
            self._bid(ctx, fqme, p.size, mean - p.entry_z * std)
            ctx.sell(fqme, p.size, limit=self._ceil(mean + p.entry_z * std))
        elif pos > 0:
            ctx.sell(fqme, pos, limit=self._ceil(mean + p.exit_z * std))
        else:
            self._bid(ctx, fqme, -pos, mean - p.exit_z * std)

    def _bid(self, ctx: StrategyContext, fqme: str, size: float, price: float) -> None:
        limit = self._floor(price)
        if limit <= 0:  # a band below zero on a wild bar: no sensible bid
            ctx.log.info('signal.skip_bid', fqme=fqme, price=price)
            return
        ctx.buy(fqme, size, limit=limit)

    def _floor(self, price: float) -> float:
        tick = self.params.tick
        return round(math.floor(price / tick + 1e-9) * tick, 10)

    def _ceil(self, price: float) -> float:
        tick = self.params.tick
        return round(math.ceil(price / tick - 1e-9) * tick, 10)
