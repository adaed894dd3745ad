"""bot.toml schema: every field validated, one clear line per bad file."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from piker.config import (
    BotCfg,
    ConfigError,
    load_config,
    read_toml,
    remove_stale_temps,
    state_dir,
    write_toml_atomic,
)
from tests.conftest import run_piker


def write(tmp_path: Path, text: str, name: str = 'bot.toml') -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_paper_on_sim():
    cfg = BotCfg()
    assert cfg.mode == 'paper' and cfg.backend == 'sim'
    assert cfg.registry.addr == ('127.0.0.1', 6116)


def test_full_file_loads(tmp_path):
    p = write(tmp_path, '''
name = "demo"
mode = "paper"
[registry]
port = 7000
[risk]
max_order_size = 5
[[strategies]]
name = "x"
strategy = "sma_cross"
markets = ["btcusd.sim"]
timeframe_secs = 5
params = { fast = 3, slow = 8 }
[strategies.schedule.window]
days = "mon-fri"
start = "09:30"
end = "16:00"
''')
    cfg = load_config(p)
    assert cfg.registry.port == 7000
    assert cfg.risk.max_order_size == 5
    assert cfg.strategies[0].params == {'fast': 3, 'slow': 8}
    assert cfg.strategies[0].schedule.window.start == '09:30'


@pytest.mark.parametrize('text, expected', [
    ('[risk]\nmax_position = "lots"',
     "`$.risk.max_position` = 'lots': Expected `float`, got `str`; fix `max_position`"),
    ('mode = "yolo"', "`$.mode` = 'yolo': Invalid enum value 'yolo'; fix `mode`"),
    ('[registry]\nport = 70000', '`$.registry.port` = 70000: Expected `int` <= 65535; fix `port`'),
    ('[risk]\nmax_order_size = -1',
     '`$.risk.max_order_size` = -1: Expected `float` > 0.0; fix `max_order_size`'),
    ('[riks]\nmax_order_size = 1', '`$.riks`: unknown key (remove it or check its spelling)'),
    ('[[strategies]]\nname = "a"\nmarkets = ["x.sim"]',
     '`$.strategies[0].strategy`: missing (add `strategy = ...`)'),
    ('name = ', 'invalid TOML'),
    ('[risk]\nmax_position = inf', '`$.risk.max_position` = inf: expected a finite number'),
    ('[paper.fees_by_market."btcusd.sim"]\nbps = nan',
     "`$.paper.fees_by_market['btcusd.sim'].bps` = nan: expected a finite number; fix `bps`"),
    ('[paper.fees_by_market."btcusd.sim"]\nbps = -1',
     "`$.paper.fees_by_market[...].bps`: Expected `float` >= 0.0; fix `bps`"),
    ('[health]\nheartbeat_secs = 1e-300',
     '`$.health.heartbeat_secs` = 1e-300: expected seconds within 0.05..60; fix `heartbeat_secs`'),
    ('[health]\nheartbeat_secs = 1\nstale_after_secs = 1.5',
     '`$.health.stale_after_secs` = 1.5: expected at least twice `heartbeat_secs` (1)'),
    ('[registry]\nhost = "0.0.0.0"',
     "`$.registry.host` = '0.0.0.0': binds beyond this machine, and tractor RPC has no "
     'authentication; fix `host` (use 127.0.0.1, or set `allow_remote = true` in [registry]'),
    ('[[strategies]]\nname = "a"\nstrategy = "x"\nmarkets = ["x.sim"]\naccount = "../x"',
     "`$.strategies[0].account` = '../x': expected a name"),
    ('[[strategies]]\nname = "a"\nstrategy = "x"\nmarkets = ["x.sim"]\n'
     'timeframe_secs = 9223372036854775807',
     '`$.strategies[0].timeframe_secs` = 9223372036854775807: expected a period samplerd serves '
     '(1 s to 1 day, dividing a day); fix `timeframe_secs`'),
])
def test_bad_file_names_file_and_key(tmp_path, text, expected):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert msg.startswith(f'{p}: ')
    assert expected in msg
    assert '\n' not in msg


def test_duplicate_strategy_names_rejected(tmp_path):
    p = write(tmp_path, '''
[[strategies]]
name = "a"
strategy = "sma_cross"
markets = ["btcusd.sim"]
[[strategies]]
name = "a"
strategy = "sma_cross"
markets = ["ethusd.sim"]
''')
    with pytest.raises(ConfigError, match="duplicate strategy name 'a'"):
        load_config(p)


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match='pass `-c FILE`'):
        load_config(tmp_path / 'nope.toml')


def test_cli_check_bad_file_exit_2_one_line(tmp_path):
    p = write(tmp_path, '[risk]\nmax_position = "lots"\n')
    res = run_piker('bot', 'check', '-c', str(p))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert str(p) in lines[0] and '$.risk.max_position' in lines[0]
    assert 'Traceback' not in res.stderr


def test_cli_check_good_file_exit_0(tmp_path):
    p = write(tmp_path, 'name = "ok"\n[[strategies]]\nname = "once"\n'
              'strategy = "tests.strategies.buy_once"\nmarkets = ["btcusd.sim"]\n')
    res = run_piker('bot', 'check', '-c', str(p))
    assert res.returncode == 0, res.stderr
    assert 'ok' in res.stdout


@pytest.mark.parametrize('secs', [1, 2, 5, 15, 60, 300, 3600, 86_400])
def test_periods_the_schema_takes_are_periods_samplerd_serves(tmp_path, secs):
    from piker.config import MAX_PERIOD_SECS as CFG_MAX
    from piker.config import MIN_PERIOD_SECS as CFG_MIN
    from piker.data._timing import MAX_PERIOD_SECS, MIN_PERIOD_SECS, check_period
    assert (CFG_MIN, CFG_MAX) == (MIN_PERIOD_SECS, MAX_PERIOD_SECS)
    p = write(tmp_path, f'[brokers.replay]\ntimeframe_secs = {secs}\n')
    assert check_period(load_config(p).brokers.replay.timeframe_secs) == secs


@pytest.mark.parametrize('secs', [0, -1, 7, 86_401, 2 ** 40])
def test_periods_samplerd_cannot_serve_or_not_dividing_a_day_rejected(tmp_path, secs):
    p = write(tmp_path, f'[brokers.replay]\ntimeframe_secs = {secs}\n')
    with pytest.raises(ConfigError, match='expected a period samplerd serves'):
        load_config(p)


def test_allow_remote_lets_the_registry_off_loopback(tmp_path):
    # only parsed: nothing binds here
    p = write(tmp_path, '[registry]\nhost = "0.0.0.0"\nallow_remote = true\n')
    assert load_config(p).registry.addr == ('0.0.0.0', 6116)
    for host in ('127.0.0.1', '127.3.2.1', 'localhost', '::1'):
        assert load_config(write(tmp_path, f'[registry]\nhost = "{host}"\n')).registry.host == host


def test_is_loopback_host_needs_no_dns():
    from piker.config import is_loopback_host
    assert is_loopback_host('127.0.0.1') and is_loopback_host('localhost')
    assert is_loopback_host('::1') and is_loopback_host('127.255.0.9')
    for host in ('0.0.0.0', '::', '10.0.0.1', '192.0.2.1', 'example.com', ''):
        assert not is_loopback_host(host)


def test_cross_field_rules_apply_to_every_parse(tmp_path):
    """Sub-tables converted elsewhere (emsd, brokers) get the same rules."""
    import msgspec

    from piker.config import HealthCfg, SupervisionCfg
    with pytest.raises(msgspec.ValidationError, match='at least twice'):
        msgspec.convert({'heartbeat_secs': 2, 'stale_after_secs': 3}, HealthCfg)
    with pytest.raises(msgspec.ValidationError, match='at least `backoff_secs`'):
        msgspec.convert({'backoff_secs': 2, 'max_backoff_secs': 1}, SupervisionCfg)


def test_a_credential_value_never_shows_in_an_error(tmp_path, monkeypatch):
    creds = tmp_path / 'creds'
    creds.mkdir()
    (creds / 'ib.toml').write_text('accounts = "U7654321"\n')
    monkeypatch.setenv('CREDENTIALS_DIRECTORY', str(creds))
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, 'name = "x"\n'))
    assert '`$.brokers.ib.accounts`' in str(info.value)
    assert 'U7654321' not in str(info.value)


def test_state_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv('PIKER_STATE_DIR', raising=False)
    monkeypatch.setenv('STATE_DIRECTORY', str(tmp_path / 'sd') + ':/other')
    monkeypatch.setenv('XDG_STATE_HOME', str(tmp_path / 'xdg'))
    assert state_dir() == tmp_path / 'sd'
    assert state_dir(str(tmp_path / 'cli')) == tmp_path / 'cli'
    monkeypatch.delenv('STATE_DIRECTORY')
    assert state_dir() == tmp_path / 'xdg' / 'piker-bot'


def test_atomic_write_roundtrip_and_no_temp_left(tmp_path):
    target = tmp_path / 'sub' / 'positions.toml'
    write_toml_atomic(target, {'positions': [{'fqme': 'btcusd.sim', 'size': 1.5}], 'none': None})
    assert read_toml(target) == {'positions': [{'fqme': 'btcusd.sim', 'size': 1.5}]}
    assert [p.name for p in target.parent.iterdir()] == ['positions.toml']
    (target.parent / '.positions.toml.abc.tmp').write_text('torn')
    assert remove_stale_temps(target.parent) == 1


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / 'x.toml'
    write_toml_atomic(target, {'a': 1})
    with pytest.raises(TypeError):
        write_toml_atomic(target, {'a': object()})
    assert read_toml(target) == {'a': 1}
    assert os.listdir(tmp_path) == ['x.toml']


def test_credentials_directory_fills_the_ib_table(tmp_path, monkeypatch):
    creds = tmp_path / 'creds'
    creds.mkdir()
    (creds / 'ib.toml').write_text('[accounts]\nlive = "U7654321"\n')
    p = write(tmp_path, '[brokers.ib]\nports = [4002]\n[brokers.ib.accounts]\npaper = "DU1"\n')
    monkeypatch.setenv('CREDENTIALS_DIRECTORY', str(creds))
    cfg = load_config(p)
    assert cfg.brokers.ib.accounts == {'paper': 'DU1', 'live': 'U7654321'}
    assert cfg.brokers.ib.ports == [4002]
    (creds / 'ib.toml').write_text('accounts = ')
    with pytest.raises(ConfigError, match='ib.toml: invalid TOML in credential'):
        load_config(p)
    (creds / 'ib.toml').write_text('acounts = {}\n')
    with pytest.raises(ConfigError, match='`\\$.brokers.ib.acounts`: unknown key'):
        load_config(p)
