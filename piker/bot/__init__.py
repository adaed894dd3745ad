"""The strategy actor runtime and the Strategy API strategies are written against."""
from ._loader import StrategyLoadError as StrategyLoadError
from ._loader import available_strategies as available_strategies
from ._loader import build_params as build_params
from ._loader import load_strategy as load_strategy
from ._loader import validate_strategies as validate_strategies
from ._runner import RunnerSummary as RunnerSummary
from ._runner import StrategyRunner as StrategyRunner
from ._schedule import TradingWindow as TradingWindow
from ._schedule import run_jobs as run_jobs
from ._strategy import OpenOrder as OpenOrder
from ._strategy import Strategy as Strategy
from ._strategy import StrategyContext as StrategyContext
from ._strategy import StrategyError as StrategyError
from ._strategy import StrategyParams as StrategyParams
