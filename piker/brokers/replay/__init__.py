"""The `replay` backend: OHLC history from files, paced in real time or faster."""
from ._csv import COLUMNS as COLUMNS
from ._csv import ReplayFileError as ReplayFileError
from ._csv import ReplayTick as ReplayTick
from ._csv import infer_timeframe_secs as infer_timeframe_secs
from ._csv import parse_ohlc_csv as parse_ohlc_csv
from ._csv import read_ohlc_csv as read_ohlc_csv
from ._csv import replay_ticks as replay_ticks
from ._csv import ticks_for_bar as ticks_for_bar

# what this backend serves per daemon kind (see piker/brokers/_protocol.py)
ENDPOINTS = {
    'datad': {
        'module': 'piker.brokers.replay.feed',
        'endpoints': ['market_info', 'history', 'stream_quotes', 'search', 'wall_clock'],
    },
}
