"""The Interactive Brokers backend: ``datad.ib`` (feeds) and ``brokerd.ib``
(orders), each running ib_async 2.1 on asyncio inside an ``infect_asyncio``
actor with its own client-id block (see ``api.py``).

Modules: ``api`` (the raw ib_async client, asyncio side), ``_proxy`` (the
trio → asyncio method proxy), ``_link`` (connection supervision),
``symbols`` (fqme ↔ contract, the cache), ``feed`` (datad endpoints),
``broker`` (the trade dialog). This package itself imports no ib_async.
"""
from .symbols import ContractCache as ContractCache
from .symbols import ContractInfo as ContractInfo
from .symbols import ContractSpec as ContractSpec

# what this backend serves per daemon kind (see piker/brokers/_protocol.py)
ENDPOINTS = {
    'datad': {
        'module': 'piker.brokers.ib.feed',
        'endpoints': ['market_info', 'history', 'stream_quotes', 'search', 'open_client'],
        'infect_asyncio': True,
    },
    'brokerd': {
        'module': 'piker.brokers.ib.broker',
        'endpoints': ['brokerd_init', 'open_broker_session', 'link_status'],
        'infect_asyncio': True,
    },
}
