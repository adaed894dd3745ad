"""The operator commands (``piker bot status|halt|resume|flatten``) against a
running ``piker bot run`` process tree, each checked in its effect on the
tree, in the strategy's order flow and in ``<state_dir>/audit.jsonl``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from piker.clearing._audit import AUDIT_NAME, read_audit
from tests.conftest import PikerProc, descendants, free_port, run_piker
from tests.test_ops import (
    PROBE,
    STARTUP_SECS,
    WIDE_BAND_RISK,
    events,
    probe_strategies_dir,
    start_bot,
    stop_and_check_exit,
    utc_now_iso,
    wait_until,
    write_bot_toml,
)

FQME = 'btcusd.sim'


def operator(cfg: Path, reg: tuple[str, int], *args: str) -> dict[str, Any]:
    res = run_piker('bot', *args, '--json', '-c', str(cfg), '--registry', f'{reg[0]}:{reg[1]}',
                    timeout=60)
    assert res.returncode == 0, f'piker bot {" ".join(args)}: {res.stderr[-3000:]}'
    return json.loads(res.stdout)


def position(result: dict[str, Any], fqme: str = FQME) -> float:
    sizes = [p['size'] for p in result['status']['positions'] if p['fqme'] == fqme]
    return sizes[0] if sizes else 0.0


def probe_orders(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for o in result['status']['open_orders'] if o['source'] == 'probe']


def rested_after(proc: PikerProc, mark: str) -> list[str]:
    """oids the paper broker started resting after ``mark``."""
    return [r['oid'] for r in events(proc, 'paper.rest') if r['timestamp'] > mark]


def test_status_halt_resume_flatten_against_running_bot_each_audited(
    reg_addr, tmp_path, piker_procs,
):
    cfg = write_bot_toml(tmp_path, [PROBE], probe_strategies_dir(tmp_path),
                         risk=WIDE_BAND_RISK)
    proc = start_bot(piker_procs, tmp_path, cfg, reg_addr)
    wait_until(lambda: events(proc, 'bot.ready'), STARTUP_SECS, 'bot.ready', proc)
    resting = wait_until(lambda: rested_after(proc, ''), 20, 'a resting probe order', proc)[0]
    audit_path = tmp_path / 'state' / AUDIT_NAME

    # status: actors with liveness, the position, the open order, not halted
    st = operator(cfg, reg_addr, 'status')
    actors = {a['name']: a for a in st['actors']}
    for name in ('bot.probe', 'emsd', 'datad.sim', 'samplerd', 'paperboi.sim', 'healthd'):
        assert actors[name]['state'] == 'ok', actors[name]
        assert 0 <= actors[name]['heartbeat_age_secs'] < 1.5
        assert actors[name]['pid'] in descendants(proc.pid)
    assert st['status']['halted'] is False
    assert position(st) == 1.0
    assert resting in {o['oid'] for o in probe_orders(st)}
    assert [s['state'] for s in st['strategies'] if s['strategy'] == 'probe'] == ['running']
    assert read_audit(audit_path) == []  # reading is not an action
    text = run_piker('bot', 'status', '-c', str(cfg), '--registry',
                     f'{reg_addr[0]}:{reg_addr[1]}', timeout=60)
    assert text.returncode == 0, text.stderr[-3000:]
    assert 'mode: paper   halted: no' in text.stdout
    for heading in ('actors:', 'strategies:', 'positions:', 'open orders:'):
        assert heading in text.stdout
    assert resting in text.stdout and 'bot.probe' in text.stdout

    # halt: open orders canceled, the strategy's next order refused
    mark = utc_now_iso()
    halted = operator(cfg, reg_addr, 'halt', '--reason', 'ops drill')
    assert halted['status']['halted'] is True
    assert halted['status']['halt']['reason'] == 'ops drill'
    assert resting in halted['canceled']
    refused = wait_until(
        lambda: [r for r in events(proc, 'order.rejected')
                 if r['actor'] == 'emsd' and r['timestamp'] > mark], 10,
        'the probe to be refused while halted', proc)
    assert refused[0]['rule'] == 'halted' and refused[0]['source'] == 'probe'
    assert [r for r in events(proc, 'order.rejected')
            if r['actor'] == 'bot.probe' and r['timestamp'] > mark]
    assert rested_after(proc, mark) == []
    st = operator(cfg, reg_addr, 'status')
    assert st['status']['halted'] is True and probe_orders(st) == []
    assert position(st) == 1.0  # halting stops new risk, it does not trade

    # resume: the strategy's orders are accepted again
    mark = utc_now_iso()
    resumed = operator(cfg, reg_addr, 'resume')
    assert resumed['status']['halted'] is False
    new_rest = wait_until(lambda: rested_after(proc, mark), 10,
                          'a new resting order after resume', proc)[0]

    # flatten: the working order pulled, the position closed at market
    flat = operator(cfg, reg_addr, 'flatten')
    assert len(flat['flatten']) == 1
    flatten_oid = flat['flatten'][0]
    wait_until(lambda: [r for r in events(proc, 'order.fill')
                        if r['actor'] == 'emsd' and r['oid'] == flatten_oid], 10,
               'the flatten order to fill', proc)
    st = operator(cfg, reg_addr, 'status')
    assert position(st) == 0.0
    # the strategy saw the operator's fill too: its own view of the position is flat
    wait_until(lambda: [r for r in events(proc, 'position.external_fill')
                        if r['position'] == 0.0], 10, 'the strategy to see the flatten', proc)
    assert new_rest not in {o['oid'] for o in st['status']['open_orders']}

    audit = read_audit(audit_path)
    assert [a['action'] for a in audit] == ['halt', 'cancel_all', 'resume', 'flatten']
    assert all(a['by'].startswith('operator:') for a in audit)
    assert audit[0]['reason'] == 'ops drill'
    assert resting in audit[1]['oids']
    assert audit[2]['previous_reason'] == 'ops drill'
    assert audit[3]['oids'] == [flatten_oid] and audit[3]['positions'] == {FQME: 1.0}

    stop_and_check_exit(proc, descendants(proc.pid))


def test_operator_command_without_a_running_bot_says_how_to_start_one(tmp_path):
    port = free_port()
    res = run_piker('bot', 'status', '--registry', f'127.0.0.1:{port}',
                    '--state-dir', str(tmp_path), timeout=30)
    assert res.returncode == 1
    assert f'no bot is running on 127.0.0.1:{port}' in res.stderr
    assert '`piker bot run`' in res.stderr
