"""The embedded `sim` backend: a seeded synthetic market that needs no network."""
from ._model import DEFAULT_MARKETS as DEFAULT_MARKETS
from ._model import MarketInfo as MarketInfo
from ._model import SimError as SimError
from ._model import SimMarket as SimMarket
from ._model import SimTick as SimTick
from ._model import get_market as get_market
from ._model import history as history
from ._model import list_fqmes as list_fqmes
from ._model import market_info as market_info
from ._model import quotes_between as quotes_between
from ._model import search as search

# what this backend serves per daemon kind (see piker/brokers/_protocol.py)
ENDPOINTS = {
    'datad': {
        'module': 'piker.brokers.sim.feed',
        'endpoints': ['market_info', 'history', 'stream_quotes', 'search'],
    },
}
