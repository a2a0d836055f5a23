"""The ledger's names that the command line needs without the ledger itself (it loads
entries, records and the network with them): its error and the entry-ID prefixes that
``mtor-peer ledger prove`` takes. :mod:`mtor_p2p.ledger.store` re-exports them."""

from __future__ import annotations

__all__ = ["MIN_ENTRY_PREFIX", "LedgerError", "is_entry_prefix"]

#: The fewest hex digits of an entry ID :meth:`Ledger.prove` accepts as a prefix.
MIN_ENTRY_PREFIX = 8


def is_entry_prefix(text: str) -> bool:
    """Whether ``text`` (any case, surrounding spaces ignored) is an entry ID or a prefix of
    one that :meth:`Ledger.prove` takes: :data:`MIN_ENTRY_PREFIX` to 64 hex digits."""
    text = text.strip().lower()
    return MIN_ENTRY_PREFIX <= len(text) <= 64 and all(c in "0123456789abcdef" for c in text)


class LedgerError(Exception):
    """The ledger cannot be used as asked (another network's file, a closed ledger...)."""
