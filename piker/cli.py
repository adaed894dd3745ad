"""``piker ...`` commands.

Commands that talk to a running tree attach to pikerd on the registry address
(``registry`` in bot.toml, or ``--registry HOST:PORT``). Errors a user can fix
are one line on stderr and exit status 2; no tracebacks.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
import trio

from . import config as _config
from .config import BotCfg, ConfigError

if TYPE_CHECKING:
    from .service import StrategyCode

EXIT_USAGE = 2


def fail(msg: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f'piker: error: {msg}', err=True)
    sys.exit(code)


class Ctx:
    """What every command needs: the config, its source, and overrides."""

    def __init__(self, cfg: BotCfg, source: str | None, registry: tuple[str, int],
                 state_dir: Path | None) -> None:
        self.cfg = cfg
        self.source = source
        self.registry = registry
        self.state_dir_override = state_dir

    @property
    def strategies_dir(self) -> Path:
        base = Path(self.source).resolve().parent if self.source else Path.cwd()
        return (base / self.cfg.strategies_dir).resolve()

    def state_dir(self) -> Path:
        return _config.state_dir(
            str(self.state_dir_override) if self.state_dir_override else None, self.cfg)


def parse_registry(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(':')
    host = host or '127.0.0.1'
    try:
        addr = (host, int(port))
    except ValueError:
        fail(f'bad --registry {text!r}: expected HOST:PORT (e.g. 127.0.0.1:6116)')
    if not 1 <= addr[1] <= 65535:
        fail(f'bad --registry {text!r}: the port must be within 1..65535 (e.g. 127.0.0.1:6116)')
    return addr


def load_ctx(config_path: str | None, registry: str | None, state_dir: str | None,
             require_file: bool = False) -> Ctx:
    source: str | None = None
    try:
        if config_path:
            cfg = _config.load_config(config_path)
            source = config_path
        elif Path(_config.DEFAULT_CONFIG_NAME).exists():
            cfg = _config.load_config(_config.DEFAULT_CONFIG_NAME)
            source = _config.DEFAULT_CONFIG_NAME
        elif require_file:
            fail(f'no config: pass `-c FILE` or create ./{_config.DEFAULT_CONFIG_NAME}')
        else:
            cfg = BotCfg()
    except ConfigError as err:
        fail(str(err))
    reg = cfg.registry.addr
    if registry:
        reg = parse_registry(registry)
        # the override obeys the same loopback rule as `[registry] host`
        if not cfg.registry.allow_remote and not _config.is_loopback_host(reg[0]):
            fail(f'--registry {registry}: binds beyond this machine, and tractor RPC has no '
                 f'authentication; {_config.REMOTE_FIX}')
    return Ctx(cfg, source, reg, Path(state_dir) if state_dir else None)


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option('--state-dir', default=None, type=click.Path(file_okay=False),
                      help='state directory (default: $STATE_DIRECTORY or XDG state dir)')(fn)
    fn = click.option('--registry', default=None, metavar='HOST:PORT',
                      help='registry address (default: `registry` in bot.toml, 127.0.0.1:6116)')(fn)
    fn = click.option('-c', '--config', 'config_path', default=None,
                      type=click.Path(dir_okay=False),
                      help='bot config file (default: ./bot.toml)')(fn)
    return fn


def run_trio(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` under trio, turning user-fixable errors into one line."""
    from .service import RuntimeStartupError, ServiceUnavailable
    try:
        return trio.run(fn, *args)
    except (ConfigError, RuntimeStartupError, ServiceUnavailable) as err:
        fail(str(err))
    except KeyboardInterrupt:
        sys.exit(130)


def emit_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        click.echo('(none)')
        return
    cells = [[('' if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo('  '.join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        click.echo('  '.join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


class PikerGroup(click.Group):
    """Usage errors are one ``piker: error:`` line too, like every other error."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs['standalone_mode'] = False
        try:
            return super().main(*args, **kwargs)
        except click.ClickException as err:
            ctx = getattr(err, 'ctx', None)
            hint = f' (see `{ctx.command_path} --help`)' if ctx is not None else ''
            fail(f"{err.format_message().rstrip('.')}{hint}", code=err.exit_code)
        except click.Abort:
            fail('aborted', code=1)


@click.group(cls=PikerGroup, context_settings={'help_option_names': ['-h', '--help']})
def main() -> None:
    """piker-bot: an unattended trading service on a tractor actor tree."""


# -- pikerd ------------------------------------------------------------------

async def _serve_until_signal(ctx: Ctx) -> int:
    """pikerd in the foreground until a signal or an escalation; the exit code."""
    from .service import open_runtime
    cfg = ctx.cfg
    async with open_runtime(
        'pikerd', ctx.registry, loglevel=cfg.log_level,
        strategy_code=strategy_code(ctx),
        heartbeat_secs=cfg.health.heartbeat_secs,
        stale_after_secs=cfg.health.stale_after_secs,
        state_dir=str(ctx.state_dir()), require_pikerd=True,
        stop_timeout_secs=cfg.stop_timeout_secs, handle_signals=True,
        supervision=cfg.supervision,
    ) as rt:
        await rt.stop_requested.wait()
    if rt.exit_code:
        click.echo(f'piker: error: pikerd stopped: {rt.stop_reason}', err=True)
    return rt.exit_code


@main.command()
@common_options
def pikerd(config_path: str | None, registry: str | None, state_dir: str | None) -> None:
    """Run the root actor (registry + service manager) in the foreground."""
    ctx = load_ctx(config_path, registry, state_dir)
    sys.exit(run_trio(_serve_until_signal, ctx))


# -- services ----------------------------------------------------------------

async def _service_table(ctx: Ctx) -> dict[str, Any]:
    from .service import PIKERD, call_ctx, find_service, open_runtime, registry_answers
    from .service._rpc import service_table_snapshot
    if not registry_answers(ctx.registry):
        fail(f'no pikerd is running on {ctx.registry[0]}:{ctx.registry[1]} '
             '(start one with `piker pikerd` or `piker bot run`)', code=1)
    async with open_runtime('piker-cli', ctx.registry, loglevel='warning'):
        async with find_service(PIKERD) as portal:
            if portal is None:
                fail('the registry answered but pikerd is not registered', code=1)
            with trio.fail_after(10):
                return await call_ctx(portal, service_table_snapshot)


@main.command()
@common_options
@click.option('--json', 'as_json', is_flag=True, help='print JSON instead of a table')
def services(config_path: str | None, registry: str | None, state_dir: str | None,
             as_json: bool) -> None:
    """List the actors of a running tree with their liveness."""
    ctx = load_ctx(config_path, registry, state_dir)
    table = run_trio(_service_table, ctx)
    if as_json:
        click.echo(json.dumps(table))
        return
    emit_table(table['actors'], ['name', 'kind', 'pid', 'addr', 'heartbeat_age_secs', 'state',
                                 'restarts', 'last_exit'])
    if table.get('escalation'):
        click.echo(f"escalated: {table['escalation']}")


# -- bot -----------------------------------------------------------------------

@main.group()
def bot() -> None:
    """Run and inspect strategy bots."""


@bot.command('check')
@common_options
def bot_check(config_path: str | None, registry: str | None, state_dir: str | None) -> None:
    """Validate a bot config file (and its strategies)."""
    ctx = load_ctx(config_path, registry, state_dir, require_file=True)
    exit_on_problems(ctx)
    names = ', '.join(f'{s.name} ({s.strategy})' for s in ctx.cfg.strategies)
    click.echo(f'{ctx.source}: ok: mode={ctx.cfg.mode} backend={ctx.cfg.backend} '
               f'strategies: {names}')


def strategy_code(ctx: Ctx) -> StrategyCode:
    """Where strategy code may come from in this tree: pikerd's own config
    (its strategies_dir and the dotted paths it names), never an RPC argument."""
    from .service import StrategyCode
    return StrategyCode(
        strategies_dir=str(ctx.strategies_dir),
        modules=sorted({s.strategy for s in ctx.cfg.strategies if '.' in s.strategy}))


def exit_on_problems(ctx: Ctx) -> None:
    """Print every :func:`config_problems` line and exit 2, if there are any."""
    problems = config_problems(ctx.cfg, ctx.strategies_dir)
    for line in problems:
        click.echo(f'piker: error: {ctx.source or "default config"}: {line}', err=True)
    if problems:
        sys.exit(EXIT_USAGE)


def config_problems(cfg: BotCfg, strategies_dir: Path) -> list[str]:
    """Everything ``bot run`` would reject at startup, one line each:
    ``bot check`` and ``bot run`` share this, so they agree."""
    from .bot import validate_strategies
    from .brokers._protocol import BackendError, backend_endpoints
    if not cfg.strategies:
        return ['`$.strategies`: no [[strategies]] configured; add one (see '
                'strategies/README.md)']
    problems = []
    if cfg.mode == 'live':
        try:
            backend_endpoints(cfg.backend, 'brokerd')
        except BackendError:
            problems.append(
                f"mode = 'live' needs a backend with an order side, and {cfg.backend!r} has "
                "none - at `$.mode` (set mode = 'paper', or backend = 'ib')")
    return problems + validate_strategies(cfg, strategies_dir, known_markets(cfg))


def replay_span(cfg: BotCfg, markets: list[str]) -> tuple[int, int]:
    """(first bar open, last bar close) epochs over the replay files of ``markets``."""
    from .brokers.replay import ReplayFileError, read_ohlc_csv
    data_dir = Path(cfg.brokers.replay.data_dir)
    starts, ends = [], []
    for fqme in markets:
        path = data_dir / f'{fqme.split(".")[0]}.csv'
        try:
            bars = read_ohlc_csv(path)
        except (OSError, ReplayFileError) as err:
            fail(f'replay market {fqme!r}: {err}')
        if len(bars):
            starts.append(int(bars['time'][0]))
            ends.append(int(bars['time'][-1]) + cfg.brokers.replay.timeframe_secs)
    if not starts:
        fail(f'replay: no bars in the files of {markets} under {data_dir}')
    return min(starts), max(ends)


def known_markets(cfg: BotCfg) -> list[str] | None:
    """The markets a backend can be asked for without a network round trip
    (None: only the backend itself can tell, e.g. ib)."""
    if cfg.backend == 'sim':
        from .brokers.sim import list_fqmes
        return list_fqmes()
    if cfg.backend == 'replay':
        data_dir = Path(cfg.brokers.replay.data_dir)
        return sorted(f'{p.stem.lower()}.replay' for p in data_dir.glob('*.csv'))
    return None


EXTENSIONS = ('piker.data._cli', 'piker.clearing._cli', 'piker.bot._cli', 'piker.brokers._cli')


def _register_extensions() -> None:
    """Commands contributed by the sub-packages: each module decorates
    ``main`` (or ``bot``) with its own click commands on import."""
    import importlib
    for mod in EXTENSIONS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise


_register_extensions()


if __name__ == '__main__':  # pragma: no cover
    main()
