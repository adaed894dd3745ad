"""The end-of-session (and STATUS=) summary: orders, fills, positions, P&L."""
from __future__ import annotations

from typing import Any

import msgspec
import trio

from ..config import BotCfg
from ..log import get_logger
from ..service import call_ctx, find_service

log = get_logger(__name__)


class PositionLine(msgspec.Struct, frozen=True, kw_only=True):
    account: str
    fqme: str
    size: float
    avg_price: float
    realized_pnl: float
    last_price: float | None
    unrealized_pnl: float | None


class RunSummary(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    mode: str
    strategies: list[dict[str, Any]]
    positions: list[PositionLine]
    halted: bool = False

    @property
    def orders(self) -> int:
        return sum(int(s.get('orders_sent', 0)) for s in self.strategies)

    @property
    def fills(self) -> int:
        return sum(int(s.get('fills', 0)) for s in self.strategies)

    @property
    def realized_pnl(self) -> float:
        return sum(p.realized_pnl for p in self.positions)

    @property
    def unrealized_pnl(self) -> float:
        return sum(p.unrealized_pnl or 0.0 for p in self.positions)

    @property
    def all_failed(self) -> bool:
        return bool(self.strategies) and all(s.get('state') == 'failed' for s in self.strategies)

    def status_line(self) -> str:
        pos = ' '.join(f'{p.fqme}={p.size:+g}' for p in self.positions if p.size) or 'flat'
        halted = ' HALTED' if self.halted else ''
        return (f'{self.mode}{halted} | orders {self.orders} fills {self.fills} | {pos} | '
                f'pnl realized {self.realized_pnl:+.2f} unrealized {self.unrealized_pnl:+.2f}')

    def to_dict(self) -> dict[str, Any]:
        out = msgspec.to_builtins(self)
        out.update(orders=self.orders, fills=self.fills, realized_pnl=self.realized_pnl,
                   unrealized_pnl=self.unrealized_pnl)
        return out

    def render(self) -> str:
        lines = [f'session summary: {self.name} ({self.mode})']
        for s in self.strategies:
            err = f" error: {s['error']}" if s.get('error') else ''
            lines.append(f"  strategy {s['strategy']}: {s['state']}{err} | orders "
                         f"{s.get('orders_sent', 0)} (dropped {s.get('orders_dropped', 0)}) | "
                         f"fills {s.get('fills', 0)}")
        if self.positions:
            lines.append('  positions:')
            for p in self.positions:
                last = f'{p.last_price:g}' if p.last_price is not None else '-'
                upnl = f'{p.unrealized_pnl:+.2f}' if p.unrealized_pnl is not None else '-'
                lines.append(f'    {p.account} {p.fqme}: {p.size:+g} @ {p.avg_price:g} '
                             f'(last {last}) realized {p.realized_pnl:+.2f} unrealized {upnl}')
        else:
            lines.append('  positions: none')
        lines.append(f'  total: orders {self.orders}, fills {self.fills}, realized P&L '
                     f'{self.realized_pnl:+.2f}, unrealized P&L {self.unrealized_pnl:+.2f}')
        return '\n'.join(lines)


async def strategy_summary(name: str, timeout_secs: float) -> dict[str, Any] | None:
    """The strategy actor's summary, or None when it does not answer in time
    (dead, being restarted, or still loading)."""
    from ._actor import summary_snapshot
    with trio.move_on_after(timeout_secs):
        try:
            async with find_service(name) as portal:
                if portal is None:
                    return None
                return await call_ctx(portal, summary_snapshot)
        except trio.Cancelled:
            raise
        except Exception as err:
            log.debug('summary.unavailable', service=name, error=repr(err)[:300])
            return None
    return None


async def _ems_status(timeout_secs: float) -> dict[str, Any] | None:
    with trio.move_on_after(timeout_secs):
        async with find_service('emsd') as portal:
            if portal is None:
                return None
            from ..clearing._ems import status_snapshot
            return await call_ctx(portal, status_snapshot)
    return None


async def collect_summary(cfg: BotCfg, names: list[str], *,
                          strategies: list[dict[str, Any]] | None = None,
                          timeout_secs: float = 5.0) -> RunSummary:
    """Ask each strategy actor and emsd; missing answers are left out, not fatal."""
    rows: list[dict[str, Any]] = list(strategies or [])
    last_prices: dict[str, float] = {}
    for s in rows:
        last_prices.update(s.get('last_prices', {}))
    for name in names:
        try:
            summary = await strategy_summary(name, timeout_secs)
        except trio.Cancelled:
            raise
        except Exception as err:
            log.warning('summary.unavailable', service=name, error=repr(err)[:500])
            summary = None
        if summary is not None:
            rows.append(summary)
            last_prices.update(summary.get('last_prices', {}))
    try:
        ems = await _ems_status(timeout_secs)
    except trio.Cancelled:
        raise
    except Exception as err:
        log.warning('summary.unavailable', service='emsd', error=repr(err)[:500])
        ems = None
    positions = []
    for p in (ems or {}).get('positions', []):
        last = last_prices.get(p['fqme'])
        upnl = None if last is None else (last - p['avg_price']) * p['size']
        positions.append(PositionLine(
            account=p.get('account', ''), fqme=p['fqme'], size=p['size'],
            avg_price=p['avg_price'], realized_pnl=p.get('realized_pnl', 0.0),
            last_price=last, unrealized_pnl=upnl,
        ))
    return RunSummary(name=cfg.name, mode=cfg.mode, strategies=rows, positions=positions,
                      halted=bool((ems or {}).get('halted', False)))
