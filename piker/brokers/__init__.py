"""Backends: ``sim`` (embedded default), ``replay`` (files), ``ib``; each declares
its endpoints per daemon kind in an ``ENDPOINTS`` table (see ``_protocol``)."""
from ._protocol import DAEMON_KINDS as DAEMON_KINDS
from ._protocol import BackendError as BackendError
from ._protocol import DatadBackend as DatadBackend
from ._protocol import Endpoints as Endpoints
from ._protocol import backend_endpoints as backend_endpoints
from ._protocol import backend_names as backend_names
from ._protocol import get_backend as get_backend
from ._protocol import load_datad_backend as load_datad_backend
from ._protocol import parse_backend_cfg as parse_backend_cfg
