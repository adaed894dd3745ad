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
    ('[risk]\nmax_position = "lots"', "Expected `float`, got `str` - at `$.risk.max_position`"),
    ('mode = "yolo"', "Invalid enum value 'yolo' - at `$.mode`"),
    ('[registry]\nport = 70000', 'Expected `int` <= 65535 - at `$.registry.port`'),
    ('[risk]\nmax_order_size = -1', 'Expected `float` > 0.0 - at `$.risk.max_order_size`'),
    ('[riks]\nmax_order_size = 1', 'Object contains unknown field `riks`'),
    ('[[strategies]]\nname = "a"\nmarkets = ["x.sim"]',
     'Object missing required field `strategy` - at `$.strategies[0]`'),
    ('name = ', 'invalid TOML'),
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
    p = write(tmp_path, 'name = "ok"\n')
    res = run_piker('bot', 'check', '-c', str(p))
    assert res.returncode == 0, res.stderr
    assert 'ok' in res.stdout


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
    with pytest.raises(ConfigError, match='unknown field `acounts`'):
        load_config(p)
