"""The ledger's names that the command line needs without the ledger itself (it loads
entries, records and the network with them): its error and the entry-ID prefixes that
``mtor-peer ledger prove`` takes. :mod:`mtor_p2p.ledger.store` re-exports them."""

from __future__ import annotations

__all__ = ["LEDGER_RULES", "MIN_ENTRY_PREFIX", "LedgerError", "is_entry_prefix"]

#: The version of the rules by which peers decide what the ledger's entries mean: which bytes
#: are an entry, which entries pay, slash or count. Peers following different rules would
#: fold the same entries into different balances, so the ledger's gossip topics and its sync
#: protocol carry it (peers of other rules are not heard, rather than disagreed with), and a
#: ledger file records it (a version that follows older rules refuses the file; see
#: ``Ledger.__init__``).
#:
#: * 1: until 2026-12-05.
#: * 2: 2026-12-06. A receipt is valid only in the one byte form its fields encode to (the
#:   same receipt written another way was paid again); a fault proof's claim names the
#:   requester as well as the job, shard and worker (a cheating worker's second identity took
#:   the reward of its own slash); a proof that rewards nobody ranks after every other entry
#:   of its time and, in a final epoch, is always folded late (a bystander's copy burned the
#:   requester's reward).
LEDGER_RULES = 2

#: The fewest hex digits of an entry ID :meth:`Ledger.prove` accepts as a prefix.
MIN_ENTRY_PREFIX = 8


def is_entry_prefix(text: str) -> bool:
    """Whether ``text`` (any case, surrounding spaces ignored) is an entry ID or a prefix of
    one that :meth:`Ledger.prove` takes: :data:`MIN_ENTRY_PREFIX` to 64 hex digits."""
    text = text.strip().lower()
    return MIN_ENTRY_PREFIX <= len(text) <= 64 and all(c in "0123456789abcdef" for c in text)


class LedgerError(Exception):
    """The ledger cannot be used as asked (another network's file, a closed ledger...)."""


class OtherNetworkLedger(LedgerError):
    """The ledger file belongs to the network of genesis ``held``, not of ``wanted``."""

    def __init__(self, message: str, held: str, wanted: str) -> None:
        super().__init__(message)
        self.held = held
        self.wanted = wanted
