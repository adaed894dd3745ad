"""Shared small types: the msgspec Struct bases and fqme parsing.

An *fqme* (fully qualified market endpoint) names one market as
``<symbol>.<venue>.<backend>`` (``mnq.cme.ib``) or ``<symbol>.<backend>`` where
the backend has one venue per symbol (``btcusd.sim``). Every layer passes
fqmes around as plain lower-case strings; :class:`Fqme` is the parsed form.
"""
from __future__ import annotations

import msgspec


class Struct(msgspec.Struct, frozen=True, kw_only=True):
    """Base for immutable domain records."""


class Msg(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Base for wire messages: explicitly tagged, never ``forbid_unknown_fields``
    (new fields always get defaults so old peers keep decoding)."""


class FqmeError(ValueError):
    """An fqme that is malformed, unknown, or ambiguous; the text names the fix."""


class Fqme(Struct, frozen=True):
    symbol: str
    venue: str | None
    backend: str

    @classmethod
    def parse(cls, text: str) -> Fqme:
        raw = text.strip().lower()
        parts = raw.split('.')
        if len(parts) not in (2, 3) or not all(parts):
            raise FqmeError(
                f'bad fqme {text!r}: expected `<symbol>.<venue>.<backend>` '
                f"or `<symbol>.<backend>` (e.g. 'mnq.cme.ib', 'btcusd.sim')"
            )
        for part in parts:
            if not all(c.isalnum() or c in '-_/' for c in part):
                raise FqmeError(
                    f'bad fqme {text!r}: {part!r} may hold only letters, digits, `-`, `_` or `/`'
                )
        if len(parts) == 2:
            return cls(symbol=parts[0], venue=None, backend=parts[1])
        return cls(symbol=parts[0], venue=parts[1], backend=parts[2])

    @property
    def key(self) -> str:
        """The canonical fqme string."""
        if self.venue is None:
            return f'{self.symbol}.{self.backend}'
        return f'{self.symbol}.{self.venue}.{self.backend}'

    @property
    def bs_key(self) -> str:
        """The backend-less key (``mnq.cme``), as a backend's own caches use it."""
        if self.venue is None:
            return self.symbol
        return f'{self.symbol}.{self.venue}'

    def __str__(self) -> str:
        return self.key


def resolve_fqme(text: str, known: list[str]) -> str:
    """Resolve ``text`` against the ``known`` fqmes of its backend.

    A full match wins; a venue-less fqme matching exactly one listing resolves to
    it; one matching several is ambiguous and the error names every choice.
    """
    want = Fqme.parse(text)
    by_key = {Fqme.parse(k).key: k for k in known}
    if want.key in by_key:
        return by_key[want.key]
    if want.venue is None:
        matches = sorted(
            k for k in by_key
            if (f := Fqme.parse(k)).symbol == want.symbol and f.backend == want.backend
        )
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            choices = ' or '.join(repr(m) for m in matches)
            raise FqmeError(f'ambiguous fqme {text!r}: use {choices}')
    suggestions = sorted(k for k in by_key if Fqme.parse(k).symbol == want.symbol)
    hint = f'; did you mean {" or ".join(map(repr, suggestions))}?' if suggestions else ''
    raise FqmeError(f'unknown market {text!r} on backend {want.backend!r}{hint}')
