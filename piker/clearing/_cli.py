"""``piker order``, ``piker cancel``, ``piker positions``, ``piker ledger``.

order/cancel/positions attach to a running pikerd or become one for the
command's duration (mode and backends from bot.toml). ``ledger`` only reads
the files under the state dir. Output is a table on a TTY and JSON with
``--json`` (or when stdout is not a TTY). Exit status: 0 when the request did
what was asked, 1 when it was rejected or failed (the reason is one line on
stderr), 2 for usage errors and for a corrupt state file (``piker ledger`` on
a ledger that does not load: ``piker: error: <file>:<line>: ...``; like a bad
config it needs an operator, so systemd's ``RestartPreventExitStatus=2``
applies and retrying cannot help).
"""
from __future__ import annotations

import json
import sys
from typing import Any

import click
import msgspec

from ..cli import EXIT_USAGE, Ctx, common_options, emit_table, fail, load_ctx, main, run_trio
from ..types import Fqme, FqmeError
from ._messages import Status

EXIT_REJECTED = 1
# a state file that does not load (corrupt ledger): like a bad config, an operator must act
EXIT_BAD_STATE = EXIT_USAGE
ORDER_TIMEOUT_SECS = 60.0


def _want_json(flag: bool) -> bool:
    return flag or not sys.stdout.isatty()


def _ems_kwargs(ctx: Ctx, account: str, backends: list[str]) -> dict[str, Any]:
    cfg = ctx.cfg
    return {
        'mode': cfg.mode,
        'backend_cfgs': msgspec.to_builtins(cfg.brokers),
        'risk_cfg': msgspec.to_builtins(cfg.risk),
        'paper_cfg': msgspec.to_builtins(cfg.paper),
        'account': account,
        'source': 'cli',
        'backends': backends,
    }


def _runtime(ctx: Ctx):  # -> async context manager
    from ..service import open_runtime
    cfg = ctx.cfg
    return open_runtime(
        'piker-cli', ctx.registry, loglevel='error',
        heartbeat_secs=cfg.health.heartbeat_secs,
        stale_after_secs=cfg.health.stale_after_secs,
        state_dir=str(ctx.state_dir()), stop_timeout_secs=cfg.stop_timeout_secs,
    )


def _print_status(status: Status, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(msgspec.to_builtins(status)))
        return
    parts = [f'{status.state:<9}', status.oid, f'{status.action or ""} {status.size:g}',
             status.fqme, f'filled={status.filled:g}']
    if status.avg_price is not None:
        parts.append(f'avg={status.avg_price:g}')
    if status.fill_price is not None:
        parts.append(f'fill={status.fill_size:g}@{status.fill_price:g}')
    if status.reason:
        parts.append(f'reason={status.reason}')
    click.echo('  '.join(parts))


# -- order -----------------------------------------------------------------------

def _order_done(status: Status, kind: str) -> int | None:
    """Exit code once ``status`` settles the command, else None."""
    if status.state in ('rejected', 'error', 'canceled'):
        return EXIT_REJECTED
    if status.state == 'filled':
        return 0
    if kind == 'limit' and status.state in ('open', 'partial'):
        return 0
    if kind == 'stop' and status.state == 'dark':
        return 0
    return None


async def _place(ctx: Ctx, action: str, fqme: str, size: float, limit: float | None,
                 stop: float | None, account: str, as_json: bool) -> int:
    import trio

    from ._client import open_ems
    backend = Fqme.parse(fqme).backend
    kind = 'limit' if limit is not None else 'stop' if stop is not None else 'market'
    price = limit if limit is not None else stop
    async with _runtime(ctx) as rt:
        if kind == 'stop' and rt.is_pikerd:
            fail('--stop orders rest inside emsd and would die with this command: start '
                 '`piker pikerd` (or `piker bot run`) first, then place the stop')
        async with open_ems(**_ems_kwargs(ctx, account, [backend])) as ems:
            order = ems.order(fqme, action, size, kind=kind, price=price)
            with trio.fail_after(ORDER_TIMEOUT_SECS):
                await ems.send(order)
                async for status in ems.statuses:
                    if status.oid != order.oid:
                        continue
                    _print_status(status, as_json)
                    code = _order_done(status, kind)
                    if code is None:
                        continue
                    if code != 0:
                        click.echo(f'piker: error: order {order.oid} {status.state}: '
                                   f'{status.reason or "no reason given"}', err=True)
                    elif status.state in ('open', 'partial') and rt.is_pikerd:
                        click.echo(f'piker: note: order {order.oid} rests at the paper '
                                   'broker; it fills only while a pikerd runs', err=True)
                    return code
    return EXIT_REJECTED


@main.command()
@common_options
@click.argument('action', type=click.Choice(['buy', 'sell']))
@click.argument('fqme')
@click.argument('size', type=float)
@click.option('--limit', type=float, default=None, help='limit price (rests until crossed)')
@click.option('--stop', type=float, default=None,
              help='stop price: a market order once the last price crosses it')
@click.option('--account', default='paper', show_default=True)
@click.option('--json', 'as_json', is_flag=True, help='print statuses as JSON lines')
def order(config_path: str | None, registry: str | None, state_dir: str | None,
          action: str, fqme: str, size: float, limit: float | None, stop: float | None,
          account: str, as_json: bool) -> None:
    """Place an order through emsd and print its statuses until it settles."""
    ctx = load_ctx(config_path, registry, state_dir)
    if limit is not None and stop is not None:
        fail('pass either --limit or --stop, not both (stop-limit orders are not supported)')
    if not size > 0:
        fail(f'SIZE must be a positive number, got {size:g} (the side is buy/sell)')
    try:
        fqme = Fqme.parse(fqme).key
    except FqmeError as err:
        fail(str(err))
    code = run_trio(_place, ctx, action, fqme, size, limit, stop, account, _want_json(as_json))
    sys.exit(code)


# -- cancel --------------------------------------------------------------------------

async def _cancel(ctx: Ctx, oid: str, as_json: bool) -> int:
    import trio

    from ._client import open_ems
    async with _runtime(ctx):
        async with open_ems(**_ems_kwargs(ctx, 'paper', [ctx.cfg.backend])) as ems:
            with trio.fail_after(ORDER_TIMEOUT_SECS):
                await ems.cancel(oid, reason='cli')
                async for status in ems.statuses:
                    if status.oid != oid:
                        continue
                    _print_status(status, as_json)
                    if status.state == 'canceled':
                        return 0
                    if status.reason or status.state in ('rejected', 'error', 'filled'):
                        click.echo(f'piker: error: cancel {oid}: '
                                   f'{status.reason or status.state}', err=True)
                        return EXIT_REJECTED
    return EXIT_REJECTED


@main.command()
@common_options
@click.argument('oid')
@click.option('--json', 'as_json', is_flag=True, help='print statuses as JSON lines')
def cancel(config_path: str | None, registry: str | None, state_dir: str | None,
           oid: str, as_json: bool) -> None:
    """Cancel a working order by its id."""
    ctx = load_ctx(config_path, registry, state_dir)
    sys.exit(run_trio(_cancel, ctx, oid, _want_json(as_json)))


# -- positions --------------------------------------------------------------------------

async def _positions(ctx: Ctx) -> tuple[list[dict[str, Any]], dict[str, str]]:
    from ._client import open_ems
    async with _runtime(ctx):
        async with open_ems(**_ems_kwargs(ctx, 'paper', [ctx.cfg.backend])) as ems:
            rows = [msgspec.to_builtins(p) for p in ems.positions]
            for row in rows:
                row.pop('type', None)
            return rows, ems.errors


@main.command()
@common_options
@click.option('--json', 'as_json', is_flag=True, help='print JSON instead of a table')
def positions(config_path: str | None, registry: str | None, state_dir: str | None,
              as_json: bool) -> None:
    """Positions as the broker (paperboi in paper mode) reports them."""
    ctx = load_ctx(config_path, registry, state_dir)
    rows, errors = run_trio(_positions, ctx)
    for backend, error in errors.items():
        fail(f'cannot reach the {backend} broker: {error}', code=EXIT_REJECTED)
    if _want_json(as_json):
        click.echo(json.dumps(rows))
        return
    emit_table(rows, ['broker', 'account', 'fqme', 'size', 'avg_price'])


# -- ledger ------------------------------------------------------------------------------

@main.command()
@common_options
@click.option('--broker', default=None, help='only this broker/backend (e.g. sim)')
@click.option('--account', default=None, help='only this account')
@click.option('--json', 'as_json', is_flag=True, help='print JSON instead of a table')
def ledger(config_path: str | None, registry: str | None, state_dir: str | None,
           broker: str | None, account: str | None, as_json: bool) -> None:
    """Every recorded fill, from the ledgers under the state dir (read-only)."""
    from datetime import UTC, datetime

    from ..accounting import LedgerError
    from ._ledger_view import ledger_dirs, load_ledger
    ctx = load_ctx(config_path, registry, state_dir)
    rows: list[dict[str, Any]] = []
    for path in ledger_dirs(ctx.state_dir(), broker, account):
        try:
            loaded = load_ledger(path, warn=False)
        except LedgerError as err:
            fail(str(err), code=EXIT_BAD_STATE)
        for file, ids in loaded.repeated.items():
            click.echo(f'piker: warning: {file}: fill id{"s" if len(ids) > 1 else ""} '
                       f'{", ".join(map(repr, ids))} repeated with the same values, '
                       'counted once (the owner writes it back once)', err=True)
        for fill in loaded.fills:
            row = msgspec.to_builtins(fill)
            row['broker'] = row.get('broker') or path.parent.name
            row['account'] = row.get('account') or path.name
            row['time'] = datetime.fromtimestamp(fill.ts_ns / 1e9, UTC).isoformat(
                timespec='milliseconds')
            rows.append(row)
    rows.sort(key=lambda r: r['ts_ns'])
    if _want_json(as_json):
        click.echo(json.dumps(rows))
        return
    emit_table(rows, ['time', 'broker', 'account', 'fqme', 'size', 'price', 'fee', 'fill_id',
                      'oid'])
