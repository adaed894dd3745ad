"""datad endpoints of the embedded ``sim`` market (see ``_model`` for the path).

The model is a pure function of time, so the live stream simply asks it for
the ticks of each window the clock has moved through: under a wall clock at
``quote_rate_hz``, under a driven clock in one go per advance. History and
live ticks never overlap: history covers trades before ``end_epoch``, the
stream everything from it on.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np
import trio

from piker.config import SimCfg
from piker.log import get_logger
from piker.types import resolve_fqme

from . import _model

log = get_logger(__name__)

_NS = 1_000_000_000
# largest slice of ticks built and published at once after a big driven advance
_CHUNK_NS = 60 * _NS


def _markets(cfg: SimCfg) -> list[str]:
    if not cfg.markets:
        return _model.list_fqmes()
    return sorted({resolve_fqme(m, _model.list_fqmes()) for m in cfg.markets})


def _market(fqme: str, cfg: SimCfg) -> _model.SimMarket:
    return _model.get_market(resolve_fqme(fqme, _markets(cfg)), seed=cfg.seed)


_warned_rate = False


def quote_rate_hz(cfg: SimCfg) -> float:
    """The configured rate, capped at the model's resolution."""
    global _warned_rate
    if cfg.quote_rate_hz > _model.MAX_QUOTE_RATE_HZ:
        if not _warned_rate:
            _warned_rate = True
            log.info('sim.quote_rate_capped', configured_hz=cfg.quote_rate_hz,
                        used_hz=_model.MAX_QUOTE_RATE_HZ,
                        hint='[brokers.sim] quote_rate_hz above the model grid adds no quotes')
        return _model.MAX_QUOTE_RATE_HZ
    return cfg.quote_rate_hz


async def market_info(fqme: str, cfg: SimCfg) -> dict[str, Any]:
    market = _market(fqme, cfg)
    return msgspec.to_builtins(_model.market_info(market.fqme))


async def history(fqme: str, cfg: SimCfg, *, timeframe_secs: int, end_epoch: int,
                  count: int) -> np.ndarray:
    # building a day of the path takes ~1 s: keep datad's loop serving meanwhile
    market = _market(fqme, cfg)
    return await trio.to_thread.run_sync(
        _model.history, market, int(end_epoch), timeframe_secs, count)


async def search(pattern: str, cfg: SimCfg) -> list[str]:
    listed = set(_markets(cfg))
    return [f for f in _model.search(pattern) if f in listed]


def _tick_dict(tick: _model.SimTick) -> dict[str, Any]:
    return msgspec.to_builtins(tick)


async def stream_quotes(
    fqme: str,
    cfg: SimCfg,
    *,
    clock: Any,
    publish: Callable[[Sequence[Any]], None],
    start_ns: int,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    market = _market(fqme, cfg)
    rate_hz = quote_rate_hz(cfg)
    interval_ns = round(_NS / rate_hz)
    before = list(_model.quotes_between(market, start_ns - interval_ns, start_ns, rate_hz))
    quotes = [t for t in before if not t.is_trade] or before
    task_status.started(_tick_dict(quotes[-1]) if quotes else None)
    published_ns = start_ns  # every tick with ts < published_ns is out
    while True:
        target_ns = -(-published_ns // interval_ns) * interval_ns
        now_ns = await clock.sleep_until_ns(target_ns)
        while published_ns <= now_ns:
            hi_ns = min(now_ns + 1, published_ns + _CHUNK_NS)
            ticks = list(_model.quotes_between(market, published_ns, hi_ns, rate_hz))
            published_ns = hi_ns
            if ticks:
                publish(ticks)
