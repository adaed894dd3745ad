"""Paths, the ``bot.toml`` schema, loading, and crash-safe TOML writes.

Every config table is a frozen msgspec Struct with ``forbid_unknown_fields``:
a typo in ``bot.toml`` is an error naming the key path, never silently ignored.
State files are only ever written through :func:`write_toml_atomic`.
"""
from __future__ import annotations

import decimal
import ipaddress
import math
import os
import re
import stat
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import structlog
import tomli_w

DEFAULT_REGISTRY_PORT = 6116
DEFAULT_CONFIG_NAME = 'bot.toml'

# the largest number any limit, fee or amount may be: finite, and far beyond any real one
MAX_AMOUNT = 1e15
PositiveFloat = Annotated[float, msgspec.Meta(gt=0, le=MAX_AMOUNT)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0, le=MAX_AMOUNT)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Secs = Annotated[float, msgspec.Meta(gt=0, le=3600)]

# periods samplerd serves (piker/data/_timing.py `check_period`): whole seconds,
# 1 s .. 1 day; bot.toml also wants them to divide a day, so bars align to midnight
MIN_PERIOD_SECS = 1
MAX_PERIOD_SECS = DAY_SECS = 86_400
PeriodSecs = Annotated[int, msgspec.Meta(ge=MIN_PERIOD_SECS, le=MAX_PERIOD_SECS)]
PERIOD_EXPECTED = 'expected a period samplerd serves (1 s to 1 day, dividing a day)'

HEARTBEAT_RANGE_SECS = (0.05, 60.0)

# account, strategy and bot names end up in actor names and state file names
NAME_RE = r'^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'
Name = Annotated[str, msgspec.Meta(pattern=NAME_RE)]
NAME_EXPECTED = ('expected a name: 1-64 letters, digits, `_`, `.` or `-`, starting with a '
                 'letter or digit, no `/` or `..`')
# `sma_cross`, `sma_cross:Class` (a file in strategies_dir) or `pkg.mod[:Class]`
STRATEGY_RE = (r'^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_]*)*'
               r'(:[A-Za-z_][A-Za-z0-9_]*)?$')
StrategySpec = Annotated[str, msgspec.Meta(pattern=STRATEGY_RE)]
STRATEGY_EXPECTED = ('expected a module in strategies_dir (`sma_cross`, optionally '
                     '`sma_cross:Class`) or a dotted import path (`pkg.mod:Class`), not a path')

# what a bad value at these key paths (list indices dropped) should have been
EXPECTED = {
    '$.strategies.timeframe_secs': PERIOD_EXPECTED,
    '$.brokers.replay.timeframe_secs': PERIOD_EXPECTED,
    '$.health.heartbeat_secs': 'expected seconds within {:g}..{:g}'.format(
        *HEARTBEAT_RANGE_SECS),
    '$.name': NAME_EXPECTED,
    '$.strategies.name': NAME_EXPECTED,
    '$.strategies.account': NAME_EXPECTED,
    '$.strategies.strategy': STRATEGY_EXPECTED,
}


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` keeps a socket on this machine (no DNS lookups)."""
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


REMOTE_FIX = ('use 127.0.0.1, or set `allow_remote = true` in [registry] of bot.toml to '
              'expose the tree on purpose')


class ConfigError(Exception):
    """A config file that cannot be used; ``str()`` is one line naming file and key."""


class Cfg(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base for config tables."""


class Rule(ValueError):
    """A rule msgspec constraints cannot express (cross-field, divisibility),
    raised from ``__post_init__``; ``key`` is the field it is about."""

    def __init__(self, key: str, expected: str, fix: str | None = None) -> None:
        super().__init__(expected)
        self.key = key
        self.expected = expected
        self.fix = fix


def _check_period(key: str, secs: int) -> None:
    if DAY_SECS % secs:
        raise Rule(key, PERIOD_EXPECTED)


class RegistryCfg(Cfg, frozen=True):
    """Where pikerd listens. tractor's RPC has no authentication, so it stays
    on loopback unless ``allow_remote`` says otherwise."""
    host: str = '127.0.0.1'
    port: Port = DEFAULT_REGISTRY_PORT
    allow_remote: bool = False

    def __post_init__(self) -> None:
        if self.host != 'localhost':
            try:
                ipaddress.ip_address(self.host)
            except ValueError:
                raise Rule('host', 'expected an IP address or `localhost` (no DNS names)',
                           fix='(e.g. 127.0.0.1)') from None
        if not self.allow_remote and not is_loopback_host(self.host):
            raise Rule('host', 'binds beyond this machine, and tractor RPC has no '
                       'authentication', fix=f'({REMOTE_FIX})')

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)


class HealthCfg(Cfg, frozen=True):
    heartbeat_secs: Annotated[float, msgspec.Meta(
        ge=HEARTBEAT_RANGE_SECS[0], le=HEARTBEAT_RANGE_SECS[1])] = 1.0
    # an actor silent for longer than this is reported stale
    stale_after_secs: Secs = 5.0

    def __post_init__(self) -> None:
        if self.stale_after_secs < 2 * self.heartbeat_secs:
            raise Rule('stale_after_secs', 'expected at least twice `heartbeat_secs` '
                       f'({self.heartbeat_secs:g}): one late beat must not mark an actor stale')


class SupervisionCfg(Cfg, frozen=True):
    """pikerd's restart policy (OTP one-for-one): a daemon that dies is started
    again after a backoff; more than ``max_restarts`` deaths of one daemon
    within ``window_secs`` end the root with exit code 3 (systemd restarts
    the unit)."""
    max_restarts: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 5
    window_secs: Annotated[float, msgspec.Meta(gt=0, le=86_400)] = 60.0
    backoff_secs: Annotated[float, msgspec.Meta(ge=0.01, le=60)] = 0.25
    max_backoff_secs: Annotated[float, msgspec.Meta(ge=0.01, le=600)] = 5.0

    def __post_init__(self) -> None:
        if self.max_backoff_secs < self.backoff_secs:
            raise Rule('max_backoff_secs',
                       f'expected at least `backoff_secs` ({self.backoff_secs:g})')


class SimCfg(Cfg, frozen=True):
    seed: int = 7
    # the sim model ticks on a 100 ms grid: 10 Hz is its most (more is capped)
    quote_rate_hz: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 10.0
    markets: list[str] = msgspec.field(default_factory=list)


class ReplayCfg(Cfg, frozen=True):
    # directory holding ``<symbol>.csv`` files (see piker/brokers/replay)
    data_dir: str = 'data/replay'
    # file time per real second
    speed: Annotated[float, msgspec.Meta(ge=0.01, le=1e6)] = 1.0
    timeframe_secs: PeriodSecs = 60

    def __post_init__(self) -> None:
        _check_period('timeframe_secs', self.timeframe_secs)


class IbAccountsCfg(Cfg, frozen=True):
    # maps an account alias used in bot.toml to IB's account code (e.g. paper = "DU123456")
    aliases: dict[str, str] = msgspec.field(default_factory=dict)


class IbCfg(Cfg, frozen=True):
    host: str = '127.0.0.1'
    # tried in order: gateway live/paper, TWS live/paper
    ports: Annotated[list[Port], msgspec.Meta(min_length=1, max_length=16)] = msgspec.field(
        default_factory=lambda: [4002, 4001, 7497, 7496])
    # IB client ids are 32-bit; each process takes ids from here up
    base_client_id: Annotated[int, msgspec.Meta(ge=0, le=2_000_000_000)] = 100
    connect_timeout_secs: Annotated[float, msgspec.Meta(ge=0.1, le=600)] = 10.0
    accounts: dict[str, str] = msgspec.field(default_factory=dict)
    reconnect_max_backoff_secs: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 30.0


class BrokersCfg(Cfg, frozen=True):
    sim: SimCfg = msgspec.field(default_factory=SimCfg)
    replay: ReplayCfg = msgspec.field(default_factory=ReplayCfg)
    ib: IbCfg = msgspec.field(default_factory=IbCfg)


class RiskCfg(Cfg, frozen=True):
    max_order_size: PositiveFloat = 100.0
    max_position: PositiveFloat = 1_000.0
    max_notional: PositiveFloat = 1_000_000.0
    max_orders_per_min: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 120
    # a limit/stop price further than this fraction from the last quote is rejected
    price_band_frac: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.05
    # realized + unrealized loss for the UTC day at which new orders halt
    daily_loss_limit: PositiveFloat = 10_000.0


class FeesCfg(Cfg, frozen=True):
    per_unit: NonNegFloat = 0.0
    per_order: NonNegFloat = 0.0
    # 10_000 bps = the whole notional
    bps: Annotated[float, msgspec.Meta(ge=0, le=10_000)] = 0.0


class PaperCfg(Cfg, frozen=True):
    fees: FeesCfg = msgspec.field(default_factory=FeesCfg)
    # per-fqme overrides of the fee schedule
    fees_by_market: dict[str, FeesCfg] = msgspec.field(default_factory=dict)


class WindowCfg(Cfg, frozen=True):
    days: str = 'mon-fri'
    start: str = '09:30'
    end: str = '16:00'
    timezone: str = 'America/New_York'


class CronJobCfg(Cfg, frozen=True):
    action: Literal['flatten', 'cancel_all', 'halt', 'resume']
    # crontab fields as APScheduler's CronTrigger takes them
    day_of_week: str = '*'
    hour: str = '*'
    minute: str = '0'
    second: str = '0'
    timezone: str = 'UTC'


class ScheduleCfg(Cfg, frozen=True):
    window: WindowCfg | None = None
    jobs: list[CronJobCfg] = msgspec.field(default_factory=list)


class StrategyCfg(Cfg, frozen=True):
    name: Name
    # a module in strategies/ (``sma_cross``) or a dotted path (``pkg.mod:Class``)
    strategy: StrategySpec
    markets: list[str]
    timeframe_secs: PeriodSecs = 60
    account: Name = 'paper'
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    on_error: Literal['cancel', 'cancel_and_flatten', 'leave'] = 'cancel'
    # what a graceful stop (SIGTERM, end of `--for`) does with open orders/positions
    on_stop: Literal['cancel', 'cancel_and_flatten', 'leave'] = 'cancel'
    schedule: ScheduleCfg = msgspec.field(default_factory=ScheduleCfg)

    def __post_init__(self) -> None:
        _check_period('timeframe_secs', self.timeframe_secs)


class BotCfg(Cfg, frozen=True):
    name: Name = 'piker-bot'
    mode: Literal['paper', 'live'] = 'paper'
    registry: RegistryCfg = msgspec.field(default_factory=RegistryCfg)
    state_dir: str | None = None
    log_level: Literal['debug', 'info', 'warning', 'error'] = 'info'
    # the backend serving market data (and, in live mode, orders)
    backend: Literal['sim', 'replay', 'ib'] = 'sim'
    health: HealthCfg = msgspec.field(default_factory=HealthCfg)
    supervision: SupervisionCfg = msgspec.field(default_factory=SupervisionCfg)
    brokers: BrokersCfg = msgspec.field(default_factory=BrokersCfg)
    risk: RiskCfg = msgspec.field(default_factory=RiskCfg)
    paper: PaperCfg = msgspec.field(default_factory=PaperCfg)
    strategies: list[StrategyCfg] = msgspec.field(default_factory=list)
    # where `strategy = "<name>"` modules live; relative to the config file's directory
    strategies_dir: str = 'strategies'
    # seconds for the whole tree to stop on SIGTERM before it gives up waiting
    stop_timeout_secs: Secs = 20.0


_AT = re.compile(r'^(?P<what>.*?)(?: - at `(?P<path>\$[^`]*)`)?$', re.S)
_PATH_PART = re.compile(r'\.([^.\[]+)|\[(\d+)\]')


_MISSING = object()


def _lookup(data: Any, path: str) -> Any:
    """The value at a msgspec key path (``$.strategies[0].timeframe_secs``);
    ``_MISSING`` where the path does not say (``[...]``: some table key)."""
    node = data
    for key, index in _PATH_PART.findall(path[1:]):
        try:
            node = node[int(index)] if index else node[key]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return node


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + '...'


def _leaf(path: str) -> str:
    keys = [k for k, _ in _PATH_PART.findall(path[1:]) if k]
    return keys[-1] if keys else '$'


def _problem(path: str, value: Any, expected: str, fix: str | None = None,
             leaf: str | None = None) -> str:
    """One line: key path, value found, what was expected, which key fixes it."""
    found = '' if value is _MISSING else f' = {_show(value)}'
    tail = f' {fix}' if fix else ''
    return f'`{path}`{found}: {expected}; fix `{leaf or _leaf(path)}`{tail}'


class _Redacted:
    def __repr__(self) -> str:
        return '<credential, not shown>'


def _explain(err: msgspec.ValidationError, value_at: Callable[[str], Any]) -> str:
    match = _AT.match(str(err))
    assert match is not None  # the pattern matches any text
    what, path = match['what'], match['path'] or '$'
    if field := re.fullmatch(r'Object contains unknown field `(.+)`', what):
        return f'`{path}.{field[1]}`: unknown key (remove it or check its spelling)'
    if field := re.fullmatch(r'Object missing required field `(.+)`', what):
        return f'`{path}.{field[1]}`: missing (add `{field[1]} = ...`)'
    rule = err.__cause__
    fix = None
    if isinstance(rule, Rule):
        path, what, fix = f'{path}.{rule.key}', rule.expected, rule.fix
    expected = EXPECTED.get(re.sub(r'\[\d+\]', '', path), what)
    return _problem(path, value_at(path), expected, fix)


def _non_finite(node: Any, path: str = '$', leaf: str = '$',
                ) -> tuple[str, str, float] | None:
    """(key path, key, value) of the first inf/nan in ``node``: no limit,
    fee or amount may be infinite."""
    if isinstance(node, float) and not math.isfinite(node):
        return path, leaf, node
    items = (node.items() if isinstance(node, dict)
             else enumerate(node) if isinstance(node, list) else ())
    for key, sub in items:
        if isinstance(key, int):
            found = _non_finite(sub, f'{path}[{key}]', leaf)
        else:
            part = f'.{key}' if re.fullmatch(r'[A-Za-z0-9_-]+', key) else f'[{key!r}]'
            found = _non_finite(sub, path + part, key)
        if found:
            return found
    return None


def load_config(path: str | os.PathLike[str]) -> BotCfg:
    """Read and validate ``path``; raise :class:`ConfigError` with one clear line."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f'{p}: no such config file (pass `-c FILE` or create ./{DEFAULT_CONFIG_NAME})'
        ) from None
    except OSError as err:
        raise ConfigError(f'{p}: cannot read: {err.strerror}') from None
    try:
        data = tomllib.loads(raw.decode())
    except UnicodeDecodeError:
        raise ConfigError(f'{p}: not UTF-8 text') from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f'{p}: invalid TOML: {err}') from None
    secrets = _merge_credentials(data)
    return parse_config(data, source=str(p), secrets=secrets)


# secrets systemd hands over with LoadCredential= (never through the environment):
# `$CREDENTIALS_DIRECTORY/<backend>.toml` holds keys of that `[brokers.<backend>]` table
CREDENTIAL_BACKENDS = ('ib',)


def _merge_credentials(data: dict[str, Any], environ: dict[str, str] | None = None,
                       ) -> list[str]:
    """Merge the credential files into ``data``; the key paths they set (so an
    error about one never shows its value)."""
    env = os.environ if environ is None else environ
    cred_dir = env.get('CREDENTIALS_DIRECTORY')
    merged: list[str] = []
    if not cred_dir:
        return merged
    for backend in CREDENTIAL_BACKENDS:
        path = Path(cred_dir) / f'{backend}.toml'
        try:
            secret = tomllib.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f'{path}: cannot read credential: {err}') from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f'{path}: invalid TOML in credential: {err}') from None
        brokers = data.setdefault('brokers', {})
        if not isinstance(brokers, dict):
            return merged  # the schema check reports `$.brokers` itself
        table = brokers.setdefault(backend, {})
        if isinstance(table, dict):
            for key, value in secret.items():
                merged.append(f'$.brokers.{backend}.{key}')
                if isinstance(value, dict) and isinstance(table.get(key), dict):
                    table[key] = {**table[key], **value}
                else:
                    table[key] = value
    return merged


def parse_config(data: dict[str, Any], source: str = '<config>',
                 secrets: list[str] | tuple[str, ...] = ()) -> BotCfg:
    """Validate ``data`` (a parsed bot.toml) into a :class:`BotCfg`; every
    failure is one :class:`ConfigError` line naming key path, value and fix.
    Values under the key paths in ``secrets`` (credentials) are never shown."""
    def shown(path: str, value: Any) -> Any:
        if any(path == s or path.startswith((f'{s}.', f'{s}[')) for s in secrets):
            return _Redacted()
        return value

    bad = _non_finite(data)
    if bad:
        path, leaf, value = bad
        raise ConfigError(f'{source}: ' + _problem(path, shown(path, value),
                                                   'expected a finite number', leaf=leaf))
    try:
        cfg = msgspec.convert(data, BotCfg)
    except msgspec.ValidationError as err:
        raise ConfigError(
            f'{source}: {_explain(err, lambda path: shown(path, _lookup(data, path)))}'
        ) from None
    names = [s.name for s in cfg.strategies]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f'{source}: duplicate strategy name {dupes[0]!r} - at `$.strategies` '
            '(each [[strategies]] entry needs a unique `name`)'
        )
    return cfg


# -- paths -------------------------------------------------------------------

def state_dir(cli_value: str | None = None, cfg: BotCfg | None = None) -> Path:
    """Where state lives: ``--state-dir``, ``$STATE_DIRECTORY`` (systemd, first of a
    colon-separated list), ``state_dir`` in bot.toml, then the XDG state dir."""
    if cli_value:
        base = Path(cli_value)
    elif os.environ.get('PIKER_STATE_DIR'):
        base = Path(os.environ['PIKER_STATE_DIR'])
    elif os.environ.get('STATE_DIRECTORY'):
        base = Path(os.environ['STATE_DIRECTORY'].split(':')[0])
    elif cfg is not None and cfg.state_dir:
        base = Path(cfg.state_dir).expanduser()
    else:
        xdg = os.environ.get('XDG_STATE_HOME') or str(Path.home() / '.local' / 'state')
        base = Path(xdg) / 'piker-bot'
    base.mkdir(parents=True, exist_ok=True)
    return base


# -- crash-safe TOML ---------------------------------------------------------

def _plain(obj: Any) -> Any:
    """Make msgspec Structs and other containers TOML-serialisable; drop Nones
    (TOML has no null)."""
    if isinstance(obj, msgspec.Struct):
        obj = msgspec.to_builtins(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj if v is not None]
    return obj


# every state file (TOML snapshots, journals, the audit trail, paper orders) is
# created with this mode and every directory for state with STATE_DIR_MODE,
# whatever the umask: owner read/write, the service's group may read (see
# systemd/README.md), others nothing
STATE_FILE_MODE = 0o640
STATE_DIR_MODE = 0o750

_log = structlog.stdlib.get_logger('piker.config')
_mode_reported: set[str] = set()


def ensure_state_dir(path: str | os.PathLike[str]) -> Path:
    """``mkdir -p`` giving every directory it creates :data:`STATE_DIR_MODE`
    (``Path.mkdir(parents=True)`` leaves intermediate ones to the umask);
    existing directories are left alone."""
    target = Path(path)
    missing: list[Path] = []
    p = target
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, STATE_DIR_MODE)
        except FileExistsError:
            continue  # created by someone else meanwhile: theirs, not ours to chmod
        os.chmod(d, STATE_DIR_MODE)  # mkdir's mode is masked by the umask
    return target


def _report_mode(path: Path, mode: int, error: str | None = None) -> None:
    if str(path) in _mode_reported:
        return
    _mode_reported.add(str(path))
    if error is None:
        _log.warning('state.file_mode_fixed', path=str(path), mode=f'{mode:04o}',
                     now=f'{STATE_FILE_MODE:04o}')
    else:
        _log.warning('state.file_mode_unfixable', path=str(path), mode=f'{mode:04o}',
                     want=f'{STATE_FILE_MODE:04o}', error=error)


def fix_state_file_mode(fd: int, path: str | os.PathLike[str]) -> None:
    """Give an existing state file opened for writing :data:`STATE_FILE_MODE`,
    logging the change once per file."""
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode == STATE_FILE_MODE:
        return
    try:
        os.fchmod(fd, STATE_FILE_MODE)
    except OSError as err:  # e.g. another owner's file
        _report_mode(Path(path), mode, err.strerror or str(err))
        return
    _report_mode(Path(path), mode)


def open_state_file(path: str | os.PathLike[str], flags: int) -> tuple[int, bool]:
    """Open (creating if need be) a state file for writing; ``(fd, created)``.

    A new file gets :data:`STATE_FILE_MODE` whatever the umask. An existing
    file keeps its mode here: the caller fixes it with
    :func:`fix_state_file_mode` once it has accepted the contents (a corrupt
    ledger is refused and left exactly as it was).
    """
    p = Path(path)
    flags |= os.O_CLOEXEC
    while True:
        try:
            fd = os.open(p, flags | os.O_CREAT | os.O_EXCL, STATE_FILE_MODE)
        except FileExistsError:
            pass
        else:
            os.fchmod(fd, STATE_FILE_MODE)  # the open mode is masked by the umask
            return fd, True
        try:
            return os.open(p, flags & ~os.O_CREAT), False
        except FileNotFoundError:
            continue  # removed in between: create it after all


def write_toml_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Replace ``path`` with ``data`` as TOML so that a crash at any instant leaves
    either the old or the new file, never a torn one.

    temp file in the same dir -> write -> fsync -> ``os.replace`` -> fsync the dir.
    The file gets :data:`STATE_FILE_MODE` whatever the umask (a replaced file
    of another mode is logged once).
    """
    dest = Path(path)
    ensure_state_dir(dest.parent)
    payload = tomli_w.dumps(_plain(data)).encode()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f'.{dest.name}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as fh:
            os.fchmod(fh.fileno(), STATE_FILE_MODE)
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            old_mode = stat.S_IMODE(os.stat(dest).st_mode)
        except FileNotFoundError:
            old_mode = STATE_FILE_MODE
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if old_mode != STATE_FILE_MODE:
        _report_mode(dest, old_mode)
    dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_toml(path: str | os.PathLike[str], exact: bool = False) -> dict[str, Any]:
    """Read a state file; ``{}`` when absent. ``exact`` reads floats as Decimal.

    A corrupt file is a :class:`ConfigError` ``<path>:<line>: corrupt state file: ...``."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return {}
    return parse_state_toml(p, raw, exact)


_TOML_AT = re.compile(r'\(at line (\d+), column \d+\)$')


def parse_state_toml(path: Path, raw: bytes, exact: bool = False) -> dict[str, Any]:
    """:func:`read_toml` on bytes already read (a caller that also needs the
    text, e.g. to name the line of a bad record)."""
    parse_float = decimal.Decimal if exact else float
    try:
        text = raw.decode()
    except UnicodeDecodeError as err:
        line = raw.count(b'\n', 0, err.start) + 1
        raise ConfigError(
            f'{path}:{line}: corrupt state file: not UTF-8 text (byte {err.start}); '
            'restore it from a backup or move it aside') from None
    try:
        return tomllib.loads(text, parse_float=parse_float)
    except tomllib.TOMLDecodeError as err:
        msg = str(err)
        at = _TOML_AT.search(msg)
        if at:
            line, msg = int(at.group(1)), msg[:at.start()].rstrip()
        else:  # "(at end of document)": a truncated file
            line = max(1, len(text.splitlines()))
        raise ConfigError(
            f'{path}:{line}: corrupt state file: {msg}; restore it from a backup '
            'or move it aside') from None


def remove_stale_temps(directory: str | os.PathLike[str]) -> int:
    """Delete temp files a crashed writer left behind; returns how many."""
    n = 0
    for tmp in Path(directory).glob('.*.tmp'):
        try:
            tmp.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n
