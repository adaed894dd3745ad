"""``piker quote`` and ``piker history``.

Both attach to the pikerd on the registry address or become one for their
own run, and read the backend's ``[brokers.<backend>]`` table from bot.toml
(the fqme's suffix picks the backend). Quotes print as a table on a TTY and
as JSON lines otherwise (or with ``--json``).
"""
from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

import click
import msgspec

from piker.brokers._protocol import BackendError
from piker.cli import Ctx, common_options, emit_table, fail, load_ctx, main, run_trio
from piker.config import ConfigError
from piker.types import FqmeError

from ._api import backend_of, open_feed
from ._bus import FeedError
from ._sampler import SamplerError
from ._timing import PeriodError, parse_timeframe

_USER_ERRORS = (FqmeError, BackendError, PeriodError, FeedError, SamplerError, ConfigError)
_QUOTE_COLUMNS = ['fqme', 'bid', 'ask', 'last', 'last_size', 'volume', 'time']
_WIDTHS = {'fqme': 16, 'time': 12}


def _backend_cfg(ctx: Ctx, fqmes: list[str]) -> dict[str, Any]:
    backend = backend_of(fqmes)
    table = getattr(ctx.cfg.brokers, backend, None)
    return msgspec.to_builtins(table) if table is not None else {}


def _clock_text(ts_ns: int | None) -> str:
    if not ts_ns:
        return ''
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).strftime('%H:%M:%S.%f')[:-3]


async def _run_quote(ctx: Ctx, fqmes: list[str], backend_cfg: dict[str, Any], as_json: bool,
                     count: int | None) -> str | None:
    from piker.service import open_runtime
    async with open_runtime('piker-quote', ctx.registry, loglevel='warning',
                            state_dir=str(ctx.state_dir())):
        try:
            async with open_feed(fqmes, backend_cfg=backend_cfg, timeframes=()) as feed:
                assert feed.stream is not None
                printed = 0
                batch = list(feed.first_quotes.values())
                header = not as_json
                while count is None or printed < count:
                    _emit_quotes(batch, as_json, header)
                    header = False
                    printed += 1
                    if count is not None and printed >= count:
                        break
                    batch = await feed.stream.receive()
        except _USER_ERRORS as err:
            return str(err)
    return None


def _emit_quotes(batch: list[dict[str, Any]], as_json: bool, header: bool) -> None:
    if as_json:
        for quote in batch:
            sys.stdout.write(json.dumps(quote) + '\n')
        sys.stdout.flush()
        return
    if header:
        click.echo(_row_text({col: col.upper() for col in _QUOTE_COLUMNS}))
    for quote in batch:
        click.echo(_row_text({**quote, 'time': _clock_text(quote.get('ts_ns'))}))


def _cell(value: Any) -> str:
    if value is None:
        return ''
    return f'{value:.10g}' if isinstance(value, float) else str(value)


def _row_text(row: dict[str, Any]) -> str:
    cells = (_cell(row.get(col)) for col in _QUOTE_COLUMNS)
    return '  '.join(c.ljust(_WIDTHS.get(col, 12))
                     for c, col in zip(cells, _QUOTE_COLUMNS, strict=True)).rstrip()


@main.command()
@common_options
@click.argument('fqmes', nargs=-1, required=True)
@click.option('--json', 'as_json', is_flag=True, help='JSON lines (the default when not a TTY)')
@click.option('--count', type=click.IntRange(min=1), default=None,
              help='stop after N batches (the first quotes count as one)')
def quote(config_path: str | None, registry: str | None, state_dir: str | None,
          fqmes: tuple[str, ...], as_json: bool, count: int | None) -> None:
    """Stream live quotes of FQME... (one backend)."""
    ctx = load_ctx(config_path, registry, state_dir)
    try:
        backend_cfg = _backend_cfg(ctx, list(fqmes))
    except (FqmeError, BackendError) as err:
        fail(str(err))
    json_mode = as_json or not sys.stdout.isatty()
    error = run_trio(_run_quote, ctx, list(fqmes), backend_cfg, json_mode, count)
    if error:
        fail(error)


async def _run_history(ctx: Ctx, fqme: str, backend_cfg: dict[str, Any], timeframe_secs: int,
                       count: int) -> tuple[list[dict[str, Any]] | None, str | None]:
    from piker.service import open_runtime
    async with open_runtime('piker-history', ctx.registry, loglevel='warning',
                            state_dir=str(ctx.state_dir())):
        try:
            async with open_feed([fqme], backend_cfg=backend_cfg,
                                 timeframes=[timeframe_secs], start_stream=False,
                                 history_bars=count) as feed:
                bars = feed.attach(feed.fqmes[0], timeframe_secs).array[-count:].copy()
        except _USER_ERRORS as err:
            return None, str(err)
    return [{name: bar[name].item() for name in bars.dtype.names or ()} for bar in bars], None


@main.command()
@common_options
@click.argument('fqme')
@click.option('--timeframe', default='1m', show_default=True,
              help='bar period: <n>[s|m|h|d] or seconds')
@click.option('--count', type=click.IntRange(min=1), default=20, show_default=True,
              help='how many bars (the last is the bar in progress)')
@click.option('--json', 'as_json', is_flag=True, help='JSON lines instead of a table')
def history(config_path: str | None, registry: str | None, state_dir: str | None,
            fqme: str, timeframe: str, count: int, as_json: bool) -> None:
    """Print the last COUNT bars of FQME."""
    ctx = load_ctx(config_path, registry, state_dir)
    try:
        tf = parse_timeframe(timeframe)
        backend_cfg = _backend_cfg(ctx, [fqme])
    except (PeriodError, FqmeError, BackendError) as err:
        fail(str(err))
    rows, error = run_trio(_run_history, ctx, fqme, backend_cfg, tf, count)
    if error:
        fail(error)
    assert rows is not None
    if as_json or not sys.stdout.isatty():
        for row in rows:
            sys.stdout.write(json.dumps(row) + '\n')
        return
    table = [{k: _cell(v) for k, v in row.items()} for row in rows]
    for cells, row in zip(table, rows, strict=True):
        cells['time'] = datetime.fromtimestamp(row['time'], UTC).strftime('%Y-%m-%d %H:%M:%S')
    emit_table(table, ['time', 'open', 'high', 'low', 'close', 'volume'])

