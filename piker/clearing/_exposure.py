"""What one market's position could become: the position plus any outcome of
its working orders, on each side separately.

Working buys can only raise the position and working sells only lower it, so
whichever of them fill (in full, in part or not at all) the position ends
between ``short = position - sells`` and ``long = position + buys``. The risk
gate holds both ends to its limits. A net figure (position + buys - sells)
would let resting orders on one side hide real exposure on the other: with
``max_position = 3``, a resting buy of 3 would let a sell of 6 through.

Dark orders (stops, alerts) are not at a broker and cannot fill, so they
count from the moment they trigger, when the gate checks them again. A
modify takes effect when its broker acks it: until then the old terms may
still fill, so an order counts the larger of its new size and the sizes it
was modified from (``held``). Pure and sync, like the gate.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..types import Struct
from ._lifecycle import OrderTrack
from ._messages import Action


class Exposure(Struct, frozen=True):
    """One market's position and the unfilled size of its working orders."""
    position: float = 0.0
    buys: float = 0.0
    sells: float = 0.0

    @property
    def long(self) -> float:
        """The position if every working buy fills and no sell does."""
        return self.position + self.buys

    @property
    def short(self) -> float:
        """The position if every working sell fills and no buy does."""
        return self.position - self.sells

    def side(self, action: Action) -> float:
        """The end of the range that orders with ``action`` move."""
        return self.long if action == 'buy' else self.short

    def working(self, action: Action, size: float) -> Exposure:
        """This exposure with ``size`` more working on ``action``'s side
        (negative: less)."""
        if action == 'buy':
            return Exposure(position=self.position, buys=self.buys + size, sells=self.sells)
        return Exposure(position=self.position, buys=self.buys, sells=self.sells + size)


def fillable(track: OrderTrack, held: float = 0.0, size: float | None = None) -> float:
    """How much of this order its broker may still fill: its size (or
    ``size``, a modify's), or the ``held`` size of a modify not yet acked if
    larger, less what filled. Nothing for a dark or finished order."""
    if track.terminal or track.state == 'dark':
        return 0.0
    new = track.order.size if size is None else size
    return max(max(new, held) - track.filled, 0.0)


def working_exposure(position: float, tracks: Iterable[OrderTrack], *, account: str,
                     fqme: str, held: Mapping[str, float] | None = None) -> Exposure:
    """``position`` plus what the ``tracks`` working in ``account`` on ``fqme``
    may still fill; ``held``: oid -> the largest size a modify not yet acked
    replaced."""
    held = held or {}
    buys = sells = 0.0
    for track in tracks:
        o = track.order
        if o.fqme != fqme or o.account != account:
            continue
        left = fillable(track, held.get(o.oid, 0.0))
        if o.action == 'buy':
            buys += left
        else:
            sells += left
    return Exposure(position=position, buys=buys, sells=sells)
