"""Simple-moving-average crossover, always in the market after the first cross.

Params (``params`` of the ``[[strategies]]`` entry in bot.toml):
    fast (int, default 5)     bars in the fast SMA of closes; must be < slow
    slow (int, default 20)    bars in the slow SMA of closes
    size (float, default 1.0) position held: +size after an up-cross, -size after a down-cross

On each closed bar, with ``slow + 1`` bars available: when the fast SMA crosses
above the slow one, buy up to +size (reversing a short); when it crosses below,
sell down to -size. The SMAs are recomputed from the bar history, so a restart
keeps no state. Orders still working count towards the target, so a slow fill
never doubles the position.
"""
from __future__ import annotations

import numpy as np

from piker.bot import Strategy, StrategyContext, StrategyParams


class SmaCross(Strategy):

    class Params(StrategyParams):
        fast: int = 5
        slow: int = 20
        size: float = 1.0

        def __post_init__(self) -> None:
            if not 0 < self.fast < self.slow:
                raise ValueError(
                    f'expected 0 < `fast` < `slow`, got fast={self.fast} slow={self.slow}'
                )
            if self.size <= 0:
                raise ValueError(f'expected `size` > 0, got {self.size}')

    params: Params

    def on_bar(self, ctx: StrategyContext, fqme: str, bars: np.ndarray) -> None:
        p = self.params
        if len(bars) < p.slow + 1:
            return
        closes = bars['close']
        fast_now, fast_prev = closes[-p.fast:].mean(), closes[-p.fast - 1:-1].mean()
        slow_now, slow_prev = closes[-p.slow:].mean(), closes[-p.slow - 1:-1].mean()
        if fast_prev <= slow_prev and fast_now > slow_now:
            self._go_to(ctx, fqme, p.size)
        elif fast_prev >= slow_prev and fast_now < slow_now:
            self._go_to(ctx, fqme, -p.size)

    def _go_to(self, ctx: StrategyContext, fqme: str, target: float) -> None:
        working = sum(o.signed_remaining for o in ctx.open_orders(fqme))
        delta = target - ctx.position(fqme) - working
        ctx.log.info('signal.cross', fqme=fqme, target=target, delta=delta)
        if delta > 0:
            ctx.buy(fqme, delta)
        elif delta < 0:
            ctx.sell(fqme, -delta)
