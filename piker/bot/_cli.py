"""``piker bot run`` (the other ``bot`` commands live in piker/cli.py)."""
from __future__ import annotations

import json
import os
import re
import sys
from functools import partial
from typing import Any

import click

from ..cli import (
    bot,
    common_options,
    exit_on_problems,
    fail,
    load_ctx,
    replay_span,
    run_trio,
    strategy_code,
)

_DURATION = re.compile(r'^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$')
_UNIT_SECS = {'ms': 0.001, 's': 1.0, 'm': 60.0, 'h': 3600.0, 'd': 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m or float(m.group(1)) <= 0:
        fail(f"bad --for {text!r}: expected a positive duration like '90s', '5m' or '2h'")
    return float(m.group(1)) * _UNIT_SECS[m.group(2)]


@bot.command('run')
@common_options
@click.option('--for', 'duration', default=None, metavar='DURATION',
              help="stop after this long (e.g. 90s, 5m, 2h); default: until SIGTERM/Ctrl-C")
@click.option('--clock', type=click.Choice(['wall', 'driven']), default='wall', hidden=True,
              help='driven: time advances only through samplerd (tests, replays)')
def bot_run(config_path: str | None, registry: str | None, state_dir: str | None,
            duration: str | None, clock: str) -> None:
    """Run the bot's strategies (paper mode on the sim market by default)."""
    from ..log import get_logger, setup_logging
    from ..service import SdNotifier
    from ._run import run_bot

    # before anything can spawn: children must never inherit NOTIFY_SOCKET
    sd = SdNotifier.from_env()
    ctx = load_ctx(config_path, registry, state_dir)
    secs = parse_duration(duration) if duration else None
    exit_on_problems(ctx)
    setup_logging(ctx.cfg.log_level, actor=f'bot-run.{ctx.cfg.name}')
    log = get_logger('piker.bot')
    span = None
    if ctx.cfg.backend == 'replay':
        # replay runs on samplerd's driven clock, advanced at `speed` x real time
        clock = 'driven'
        span = replay_span(ctx.cfg, sorted({m for s in ctx.cfg.strategies for m in s.markets}))
    outcome = run_trio(lambda: run_bot(
        ctx.cfg, registry=ctx.registry, strategies_dir=ctx.strategies_dir,
        strategy_code=strategy_code(ctx),
        state_dir=ctx.state_dir(), duration_secs=secs, clock=clock, sd=sd,
        replay_span=span,
    ))
    summary = outcome.summary
    log.info('bot.summary', **summary.to_dict(), exit_code=outcome.exit_code,
             stop_reason=outcome.reason)
    if sys.stdout.isatty():
        click.echo(summary.render())
    if outcome.exit_code:
        click.echo(f'piker: error: bot run failed (exit {outcome.exit_code}): {outcome.reason}',
                   err=True)
    sys.exit(outcome.exit_code)


# -- operator commands against a running bot ------------------------------------

async def _operate(ctx: Any, action: str, **kwargs: Any) -> dict[str, Any]:
    """Run one operator action on the running tree's emsd (never spawns one)."""
    import trio

    from ..clearing._ems import status_snapshot
    from ..service import call_ctx, find_service, open_runtime, registry_answers
    from ..service._rpc import service_table_snapshot
    from ._summary import collect_summary
    if not registry_answers(ctx.registry):
        fail(f'no bot is running on {ctx.registry[0]}:{ctx.registry[1]} '
             '(start one with `piker bot run`)', code=1)
    async with open_runtime('piker-operator', ctx.registry, loglevel='warning'):
        with trio.fail_after(30):
            async with find_service('emsd') as ems:
                if ems is None:
                    fail('the tree has no emsd: no bot is trading on this registry', code=1)
                result: dict[str, Any] = {}
                by = f'operator:{os.environ.get("USER", "unknown")}'
                match action:
                    case 'halt':
                        result['halt'] = await ems.run_from_ns(
                            EMS_MODULE, 'halt', reason=kwargs['reason'], by=by)
                        result['canceled'] = await ems.run_from_ns(
                            EMS_MODULE, 'cancel_all', by=by)
                    case 'resume':
                        result['resume'] = await ems.run_from_ns(EMS_MODULE, 'resume', by=by)
                    case 'flatten':
                        result['flatten'] = await ems.run_from_ns(
                            EMS_MODULE, 'flatten', fqme=kwargs.get('fqme'), by=by)
                    case 'status':
                        pass
                status = await call_ctx(ems, status_snapshot)
            async with find_service('pikerd') as pikerd:
                if pikerd is None:
                    fail('the registry answered but pikerd is not registered', code=1)
                table = await call_ctx(pikerd, service_table_snapshot)
            bots = [row['name'] for row in table['actors'] if row['kind'] == 'bot']
            summary = await collect_summary(ctx.cfg, bots, timeout_secs=5)
    result.update(status=status, actors=table['actors'],
                  strategies=summary.strategies)
    return result


EMS_MODULE = 'piker.clearing._ems'


def _print_status(result: dict[str, Any], as_json: bool) -> None:
    from ..cli import emit_table
    if as_json:
        click.echo(json.dumps(result, default=str))
        return
    status = result['status']
    halt = status.get('halt') or {}
    click.echo(f"mode: {status.get('mode')}   halted: "
               f"{'YES (' + str(halt.get('reason')) + ' by ' + str(halt.get('by')) + ')' if status.get('halted') else 'no'}"
               f"   day P&L: {status.get('day_pnl', 0.0):+.2f}")
    click.echo('\nactors:')
    emit_table(result['actors'], ['name', 'kind', 'pid', 'heartbeat_age_secs', 'state',
                                  'restarts', 'last_exit'])
    click.echo('\nstrategies:')
    emit_table([{**s, 'phase': _phase_cell(s)} for s in result['strategies']],
               ['strategy', 'phase', 'orders_sent', 'fills', 'error'])
    click.echo('\npositions:')
    emit_table(status.get('positions', []), ['account', 'fqme', 'size', 'avg_price'])
    click.echo('\nopen orders:')
    emit_table(status.get('open_orders', []),
               ['oid', 'fqme', 'action', 'size', 'filled', 'state', 'source'])


def _phase_cell(summary: dict[str, Any]) -> str:
    """``running``, ``waiting: <reason>``, ``failed: <error>``..."""
    from ._run import phase_of
    phase = phase_of(summary)
    why = summary.get('reason') if phase == 'waiting' else None
    return f'{phase}: {why}' if why else phase


def _operator_command(name: str, help_text: str) -> Any:
    def deco(fn: Any) -> Any:
        fn = click.option('--json', 'as_json', is_flag=True, help='print JSON')(fn)
        fn = common_options(fn)
        return bot.command(name, help=help_text)(fn)
    return deco


@_operator_command('status', 'Show a running bot: actors and liveness, positions, open '
                   'orders, halted or not.')
def bot_status(config_path: str | None, registry: str | None, state_dir: str | None,
               as_json: bool) -> None:
    ctx = load_ctx(config_path, registry, state_dir)
    _print_status(run_trio(_operate, ctx, 'status'), as_json)


@_operator_command('halt', 'Stop new orders (persisted until `bot resume`) and cancel '
                   'open ones.')
@click.option('--reason', default='operator halt', help='recorded in the audit trail')
def bot_halt(config_path: str | None, registry: str | None, state_dir: str | None,
             as_json: bool, reason: str) -> None:
    ctx = load_ctx(config_path, registry, state_dir)
    result = run_trio(partial(_operate, ctx, 'halt', reason=reason))
    if not as_json:
        click.echo(f"halted; canceled {len(result['canceled'])} open orders")
    _print_status(result, as_json)


@_operator_command('resume', 'Allow new orders again after a halt (or loss-limit trip).')
def bot_resume(config_path: str | None, registry: str | None, state_dir: str | None,
               as_json: bool) -> None:
    ctx = load_ctx(config_path, registry, state_dir)
    result = run_trio(_operate, ctx, 'resume')
    if not as_json:
        click.echo('resumed')
    _print_status(result, as_json)


@_operator_command('flatten', 'Cancel open orders and close every position at market.')
@click.option('--fqme', default=None, help='only this market')
def bot_flatten(config_path: str | None, registry: str | None, state_dir: str | None,
                as_json: bool, fqme: str | None) -> None:
    ctx = load_ctx(config_path, registry, state_dir)
    result = run_trio(partial(_operate, ctx, 'flatten', fqme=fqme))
    if not as_json:
        click.echo(f"flatten orders sent: {len(result['flatten'])}")
    _print_status(result, as_json)
