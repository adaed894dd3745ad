"""The pre-trade risk gate emsd puts in front of every broker.

Pure and sync: the caller passes the last price, the market's
:class:`~piker.clearing._exposure.Exposure` (position and working orders) and
the clock, so every rule is testable without an event loop. Rules, in the
order they are checked (the first failing one is reported):

``halted``, ``invalid_order``, ``bad_limit``, ``max_order_size``, ``no_quote``,
``price_band``, ``max_notional``, ``max_position``, ``max_orders_per_min``.

Choices worth knowing:
- ``max_position`` and ``max_notional`` hold against the worst case on the
  order's side: the position if every working order on that side fills
  (``Exposure.long`` for a buy, ``Exposure.short`` for a sell), never a net
  of both sides. A modify replaces its own old remainder (``replaces``);
- an order that moves its side's worst case toward flat (without crossing
  it) always passes both: flattening an over-limit position must stay
  possible. Crossing flat counts as growing;
- notional is ``|worst case| x price`` with the price the last one, or a
  limit/stop price above it;
- a limit that is not a finite number (``inf``, ``nan``) never switches a
  rule off: every order that trades is refused (``bad_limit``) naming the
  setting;
- limit and stop orders need a quote too: without a last price the price band
  cannot be checked, and a fat-fingered limit is what the band exists for;
- ``alert`` orders never trade, so only the halt and input checks apply;
- cancels are never gated;
- a halt (operator or daily loss) is persisted with ``write_toml_atomic`` and
  reloaded by the next gate on the same path, until :meth:`RiskGate.resume`.
  A halt file that cannot be read (empty, binary, not TOML, wrong fields)
  means halted, with one error naming the file: it never lifts a halt
  silently and never stops emsd. While the day's P&L stays beyond the
  limit, the next :meth:`update_pnl` halts again: to keep trading past it,
  raise ``risk.daily_loss_limit``.
"""
from __future__ import annotations

import math
import time
from collections import Counter, deque
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from ..config import ConfigError, RiskCfg, read_toml, write_toml_atomic
from ..log import get_logger
from ..types import Struct
from ._exposure import Exposure
from ._messages import Cancel, Order

log = get_logger(__name__)

_MINUTE_NS = 60 * 1_000_000_000
_SIZE_EPS = 1e-9
HALT_FIX = 'restore it, or run `piker bot resume` to clear it'
_LIMITS = ('max_order_size', 'max_position', 'max_notional', 'max_orders_per_min',
           'price_band_frac', 'daily_loss_limit')


class RiskRejection(Struct, frozen=True):
    """Why the gate refused an order: ``rule`` is a short key, ``reason`` a
    full sentence naming the limit and the setting that controls it."""
    rule: str
    reason: str


class HaltState(Struct, frozen=True):
    """What is persisted while the gate is halted."""
    reason: str
    by: str
    since_ns: int


class RiskStatistics(Struct, frozen=True):
    checked: int
    accepted: int
    rejected_by_rule: dict[str, int]
    orders_last_min: int
    halted: bool
    halt: HaltState | None
    last_day_pnl: float | None


def _fmt(x: float) -> str:
    return f'{x:g}'


class RiskGate:
    """Checks orders against a :class:`~piker.config.RiskCfg`; owns the halt."""

    def __init__(self, cfg: RiskCfg, state_path: Path | str) -> None:
        self.cfg = cfg
        self.state_path = Path(state_path)
        self._accepted_ns: deque[int] = deque()
        self._checked = 0
        self._accepted = 0
        self._rejected: Counter[str] = Counter()
        self._last_day_pnl: float | None = None
        self._bad_limit = _bad_limit(cfg)
        if self._bad_limit is not None:
            log.error('risk.bad_limit', reason=self._bad_limit.reason)
        self._halt = self._load_halt()

    # -- halt ----------------------------------------------------------------

    def _load_halt(self) -> HaltState | None:
        path = self.state_path
        try:
            data = read_toml(path)
        except ConfigError as err:
            # its own advice (restore or move aside) gives way to HALT_FIX
            return self._unreadable_halt(
                str(err).removeprefix(f'{path}: ').split('; restore')[0])
        except OSError as err:
            return self._unreadable_halt(f'cannot be read: {err.strerror or err}')
        if not data:
            return self._unreadable_halt('it is empty') if path.exists() else None
        halted = data.get('halted')
        if halted is False:
            return None
        if halted is not True:
            return self._unreadable_halt(
                f'`halted` must be true or false, found {halted!r}' if 'halted' in data
                else 'it has no `halted` field')
        try:
            halt = msgspec.convert(data.get('halt'), HaltState)
        except msgspec.ValidationError as err:
            return self._unreadable_halt(f'the [halt] record is unreadable: {err}')
        log.warning('risk.halt_restored', reason=halt.reason, by=halt.by, path=str(path))
        return halt

    def _unreadable_halt(self, problem: str) -> HaltState:
        """A halt file that cannot be trusted keeps trading halted: it may be
        an operator's halt that a disk or an editor mangled."""
        path = self.state_path
        try:
            since_ns = path.stat().st_mtime_ns
        except OSError:
            since_ns = time.time_ns()
        reason = f'the halt file {path} is unreadable ({problem}): {HALT_FIX}'
        log.error('risk.halt_file_unreadable', path=str(path), problem=problem, fix=HALT_FIX,
                  reason=reason)
        return HaltState(reason=reason, by='risk.halt_file', since_ns=since_ns)

    @property
    def halted(self) -> bool:
        return self._halt is not None

    @property
    def halt_state(self) -> HaltState | None:
        return self._halt

    def halt(self, reason: str, by: str, now_ns: int | None = None) -> None:
        """Stop accepting new orders until :meth:`resume`; survives restarts."""
        since_ns = time.time_ns() if now_ns is None else now_ns
        self._halt = HaltState(reason=reason, by=by, since_ns=since_ns)
        write_toml_atomic(self.state_path, {
            'halted': True,
            'halt': {
                'reason': reason,
                'by': by,
                'since_ns': since_ns,
                'since': datetime.fromtimestamp(since_ns / 1e9, UTC),
            },
        })
        log.warning('risk.halt', reason=reason, by=by)

    def resume(self, by: str, now_ns: int | None = None) -> None:
        """Lift the halt (an operator's decision) and persist that."""
        at_ns = time.time_ns() if now_ns is None else now_ns
        previous = self._halt
        self._halt = None
        write_toml_atomic(self.state_path, {
            'halted': False,
            'resumed_by': by,
            'resumed_at': datetime.fromtimestamp(at_ns / 1e9, UTC),
            'previous_halt_reason': previous.reason if previous else '',
        })
        log.warning('risk.resume', by=by, previous=previous.reason if previous else None)

    def update_pnl(self, day_pnl: float, now_ns: int) -> bool:
        """Feed the UTC day's realized + unrealized P&L; halts (and returns
        ``True``) when it reaches ``-daily_loss_limit``."""
        self._last_day_pnl = day_pnl
        limit = self.cfg.daily_loss_limit
        if self.halted or not day_pnl <= -limit:
            return False
        self.halt(
            f'daily P&L {_fmt(day_pnl)} reached the loss limit {_fmt(limit)} '
            '(risk.daily_loss_limit); an operator must resume trading',
            by='risk.daily_loss_limit',
            now_ns=now_ns,
        )
        return True

    # -- checks --------------------------------------------------------------

    def check(
        self,
        order: Order | Cancel,
        *,
        last_price: float | None,
        exposure: Exposure,
        now_ns: int,
        replaces: float = 0.0,
        adds: float | None = None,
    ) -> RiskRejection | None:
        """``None`` when ``order`` may go to the broker, else the first rule it breaks.

        ``exposure`` is the market's position and what every order working
        at its broker may still fill, including the one a modify replaces;
        ``replaces`` is that order's part of it (0 for a new order, or one
        that was dark). ``adds`` is what ``order`` may fill once sent: its
        size unless the caller knows better (a modify: the larger of its new
        and its unacked old terms, less what filled).

        Call :meth:`record_accept` once the order is actually sent, so the
        per-minute rate counts only accepted orders.
        """
        if isinstance(order, Cancel):
            return None
        self._checked += 1
        adding = order.size if adds is None else adds
        rejection = self._first_rejection(order, last_price, exposure, replaces, adding, now_ns)
        if rejection is not None:
            self._rejected[rejection.rule] += 1
            log.info('risk.reject', oid=order.oid, fqme=order.fqme, rule=rejection.rule, reason=rejection.reason)
        return rejection

    def record_accept(self, now_ns: int) -> None:
        self._accepted += 1
        self._accepted_ns.append(now_ns)
        self._expire(now_ns)

    def _expire(self, now_ns: int) -> None:
        while self._accepted_ns and self._accepted_ns[0] <= now_ns - _MINUTE_NS:
            self._accepted_ns.popleft()

    def _first_rejection(
        self, order: Order, last: float | None, exposure: Exposure, replaces: float,
        adds: float, now_ns: int,
    ) -> RiskRejection | None:
        if self._halt is not None:
            return RiskRejection(
                rule='halted',
                reason=f'trading is halted since {_iso(self._halt.since_ns)} by {self._halt.by}: '
                f'{self._halt.reason}; new orders are refused until an operator resumes',
            )
        if (bad := _invalid(order)) is not None:
            return bad
        if order.kind == 'alert':
            return None
        if self._bad_limit is not None:
            return self._bad_limit
        cfg = self.cfg
        if order.size > cfg.max_order_size:
            return RiskRejection(
                rule='max_order_size',
                reason=f'order size {_fmt(order.size)} exceeds max_order_size '
                f'{_fmt(cfg.max_order_size)} (risk.max_order_size)',
            )
        if last is None or not math.isfinite(last) or last <= 0:
            return RiskRejection(
                rule='no_quote',
                reason=f'no quote yet for {order.fqme}: a {order.kind} order needs a last '
                'price to check the price band and notional; wait for the feed',
            )
        if order.kind != 'market':
            assert order.price is not None
            dev = abs(order.price - last) / last
            if dev > cfg.price_band_frac:
                return RiskRejection(
                    rule='price_band',
                    reason=f'{order.kind} price {_fmt(order.price)} is {dev:.2%} from the last '
                    f'price {_fmt(last)}, beyond price_band_frac {_fmt(cfg.price_band_frac)} '
                    '(risk.price_band_frac)',
                )
        price = max(last, order.price or 0.0) if order.kind != 'market' else last
        # a modify's old remainder makes way for its new one
        others = exposure.working(order.action, -replaces)
        before = exposure.side(order.action)
        after = others.working(order.action, adds).side(order.action)
        if _grows(before, after):
            notional = abs(after) * price
            if notional > cfg.max_notional:
                return RiskRejection(
                    rule='max_notional',
                    reason=f'worst-case notional in {order.fqme} would be {_fmt(notional)} '
                    f'({_fmt(abs(after))} x {_fmt(price)}; {_worst(order, others, adds)}), '
                    f'beyond max_notional {_fmt(cfg.max_notional)} (risk.max_notional)',
                )
            if abs(after) > cfg.max_position:
                return RiskRejection(
                    rule='max_position',
                    reason=f'position in {order.fqme} would be {_fmt(after)} '
                    f'({_worst(order, others, adds)}), beyond max_position '
                    f'{_fmt(cfg.max_position)} (risk.max_position)',
                )
        self._expire(now_ns)
        if len(self._accepted_ns) >= cfg.max_orders_per_min:
            return RiskRejection(
                rule='max_orders_per_min',
                reason=f'{len(self._accepted_ns)} orders accepted in the last 60 s reaches '
                f'max_orders_per_min {cfg.max_orders_per_min} (risk.max_orders_per_min)',
            )
        return None

    def statistics(self, now_ns: int | None = None) -> RiskStatistics:
        if now_ns is not None:
            self._expire(now_ns)
        return RiskStatistics(
            checked=self._checked,
            accepted=self._accepted,
            rejected_by_rule=dict(self._rejected),
            orders_last_min=len(self._accepted_ns),
            halted=self.halted,
            halt=self._halt,
            last_day_pnl=self._last_day_pnl,
        )


def _grows(before: float, after: float) -> bool:
    """Does the worst case move away from flat? Crossing flat counts; float
    noise (a modify that keeps its size) does not."""
    return abs(after) > abs(before) + _SIZE_EPS * max(1.0, abs(before)) or after * before < 0


def _worst(order: Order, others: Exposure, adds: float) -> str:
    """How the worst case adds up, for a rejection's reason."""
    side = order.action
    working = others.buys if side == 'buy' else others.sells
    return (f'if every working {side} fills: holding {_fmt(others.position)}, '
            f'other working {side}s {_fmt(working)}, this order {_fmt(adds)}')


def _bad_limit(cfg: RiskCfg) -> RiskRejection | None:
    """A limit the gate cannot compare against (``inf`` or ``nan`` would
    switch its rule off): every trading order is refused instead."""
    for name in _LIMITS:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value):
            return RiskRejection(
                rule='bad_limit',
                reason=f'risk.{name} = {value!r} is not a finite number, so it cannot be '
                'checked and every order is refused: set it in bot.toml [risk]',
            )
    return None


def _iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).isoformat(timespec='seconds')


def _invalid(order: Order) -> RiskRejection | None:
    if not math.isfinite(order.size) or order.size <= 0:
        return RiskRejection(
            rule='invalid_order',
            reason=f'order size must be a positive number (use action buy/sell for the side), '
            f'got {order.size!r}',
        )
    if order.kind != 'market':
        if order.price is None or not math.isfinite(order.price) or order.price <= 0:
            return RiskRejection(
                rule='invalid_order',
                reason=f'a {order.kind} order needs a positive `price`, got {order.price!r}',
            )
    return None
