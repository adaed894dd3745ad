"""pikerd: runtime boot, registry, the service manager and the health daemon."""
from ._discovery import ServiceUnavailable as ServiceUnavailable
from ._discovery import find_service as find_service
from ._discovery import maybe_spawn_daemon as maybe_spawn_daemon
from ._discovery import request_spawn as request_spawn
from ._health import maybe_spawn_healthd as maybe_spawn_healthd
from ._lifetime import daemon_lifetime as daemon_lifetime
from ._runtime import PIKERD as PIKERD
from ._runtime import Runtime as Runtime
from ._runtime import RuntimeStartupError as RuntimeStartupError
from ._runtime import get_services as get_services
from ._runtime import open_runtime as open_runtime
from ._runtime import registry_answers as registry_answers
from ._sdnotify import SdNotifier as SdNotifier
from ._services import ServiceInfo as ServiceInfo
from ._services import Services as Services
from ._spec import DaemonSpec as DaemonSpec
