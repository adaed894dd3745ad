"""Accounting: the durable fill ledger and the positions folded from it.

Imports nothing from the other piker packages except ``types``, ``config`` and
``log``: clearing converts its broker fills into :class:`Fill` records.
"""
from ._ledger import Ledger as Ledger
from ._ledger import LedgerError as LedgerError
from ._ledger import ledger_dir as ledger_dir
from ._ledger import read_positions_file as read_positions_file
from ._positions import Fill as Fill
from ._positions import Position as Position
from ._positions import apply_fill as apply_fill
from ._positions import positions_from_fills as positions_from_fills
from ._positions import validate_fill as validate_fill
