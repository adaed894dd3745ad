"""Market data: datad (feed bus, shm OHLC buffers, history, search) and samplerd
(the OHLC clock). Clients use :func:`open_feed` and :func:`open_sample_stream`.

``feed.stream`` yields batches: lists of quote dicts (keys ``QUOTE_FIELDS``) in
time order; :func:`latest_by_fqme` folds one into the latest quote per market."""
from ._api import Feed as Feed
from ._api import IncrementStream as IncrementStream
from ._api import QuoteStream as QuoteStream
from ._api import advance_clock as advance_clock
from ._api import backend_of as backend_of
from ._api import clock_info as clock_info
from ._api import latest_by_fqme as latest_by_fqme
from ._api import open_feed as open_feed
from ._api import open_sample_stream as open_sample_stream
from ._api import search as search
from ._bars import BarWriter as BarWriter
from ._bus import DEFAULT_HISTORY_BARS as DEFAULT_HISTORY_BARS
from ._bus import FeedError as FeedError
from ._clocks import DrivenClock as DrivenClock
from ._clocks import FeedClock as FeedClock
from ._clocks import ScaledClock as ScaledClock
from ._clocks import WallClock as WallClock
from ._feed import datad_init as datad_init
from ._feed import maybe_spawn_datad as maybe_spawn_datad
from ._sampler import SamplerError as SamplerError
from ._sampler import maybe_spawn_samplerd as maybe_spawn_samplerd
from ._sampler import samplerd_init as samplerd_init
from ._shm import ShmArray as ShmArray
from ._shm import ShmToken as ShmToken
from ._shm import ohlc_dtype as ohlc_dtype
from ._timing import PeriodError as PeriodError
from ._timing import parse_timeframe as parse_timeframe
from ._types import Increment as Increment
from ._types import Quote as Quote
from ._types import Tick as Tick
from ._wire import QUOTE_FIELDS as QUOTE_FIELDS
