"""``python -m tests.fake_tws``: serve a fake TWS until SIGINT/SIGTERM."""
from __future__ import annotations

import argparse
import signal
import sys

import msgspec
import trio

from ._scenario import demo_scenario
from ._server import open_fake_gateway

SCENARIOS = {'demo': demo_scenario}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m tests.fake_tws', description=__doc__)
    p.add_argument('--host', default='127.0.0.1', help='bind address (loopback by default)')
    p.add_argument('--port', type=int, default=0, help='TCP port; 0 picks a free one')
    p.add_argument('--scenario', default='demo', choices=sorted(SCENARIOS))
    p.add_argument('--tick-interval', type=float, default=None,
                   help='seconds between streamed ticks (0: only on price changes)')
    return p.parse_args(argv)


async def _main(args: argparse.Namespace) -> None:
    scenario = SCENARIOS[args.scenario]()
    if args.tick_interval is not None:
        scenario = msgspec.structs.replace(scenario, tick_interval_secs=args.tick_interval)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_fake_gateway(scenario, host=args.host, port=args.port) as gw:
            print(f'fake-tws listening on {gw.host}:{gw.port}', flush=True)
            async for signum in signals:
                print(f'fake-tws stopping on {signal.Signals(signum).name}', flush=True)
                break


def main(argv: list[str] | None = None) -> int:
    trio.run(_main, _args(argv))
    return 0


if __name__ == '__main__':
    sys.exit(main())
