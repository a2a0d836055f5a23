"""Balances derived from a set of entries: one pure fold, the same on every peer.

The fold visits receipts, stakes and fault proofs in one canonical order, ``(at, rank,
entry_id)``, whatever order they arrived in, so two peers holding the same set compute the same
state. The rules:

* **receipt**: the requester pays the worker the receipt's cost, if that leaves the requester's
  balance at or above minus its credit limit; otherwise the receipt has no effect (the worker
  did the work at its own risk: workers check the requester's credit before they compute).
  The credit limit is ``credit_limit``, or with ``credit_backing = "stake"`` the smaller of
  that and the requester's stake. Without this rule a requester and a worker colluding could
  mint unbounded credits out of the requester's debt; with it, a fresh identity can run up at
  most its credit limit (and none at all, when credit must be backed by stake).
* **transfer**: moves ``amount`` from the signer's balance to the named peer's, if the balance
  covers it at that point of the fold (a transfer cannot spend the credit limit); otherwise the
  entry is kept but has no effect.
* **stake**: moves ``amount`` from the staker's balance to its stake, if the balance covers it
  at that point of the fold and the amount is at least ``min_stake``; otherwise the entry is kept
  but has no effect (``ineffective``). Stake is locked: this version has no unstaking.
* **fault**: the first proof (in fold order) against a given shard answer (worker, job,
  shard, requester) slashes ``slash_bps`` of the accused worker's stake at that point;
  ``reporter_bps`` of the slashed amount goes to the reporter if it was the requester the
  worker answered, the rest is burned. Later proofs of the same answer do nothing. A proof
  that rewards nobody ranks after every other entry of its time, and in a final epoch is
  always late, so the requester's own proof of an answer comes first whatever the entry IDs
  and whichever of them a checkpoint lists.

**Finality.** Because every entry carries a time its signer chose, a spender could sign an
entry dated before a payment it already made and so make that payment fail in the fold (a
double spend). Checkpoints close that door. The fold walks epochs in order; when it reaches an
epoch that has a checkpoint whose signers hold the quorum of checkpoint weight *at that point*
(see :meth:`LedgerState.weight`), only the entries listed in that checkpoint take effect in
place. Any other entry dated into a finalised epoch is *late*: it is applied after every
in-place entry of every epoch, so it can never undo a finalised payment, only fail itself.
Without stake (no checkpoints) the fold is plain time order.

Every rule moves credits between balances, stakes and the burned pool, so
``sum(balances) + sum(stakes) + burned == genesis supply`` always holds: no entry can create
credits. All amounts are integers (nano-credits).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from mtor_p2p.ledger.genesis import Genesis


class Event(NamedTuple):
    """What the fold needs of one entry, in sort order."""

    at: float
    rank: int
    entry_id: str
    kind: str
    payer: str
    payee: str
    amount: int
    claim: str


@dataclass(frozen=True)
class CheckpointLeaves:
    """What the fold needs of a verified checkpoint: who signed it and which entries it lists."""

    entry_id: str
    epoch: int
    signers: tuple[str, ...]
    leaves: frozenset[str]  # entry IDs


@dataclass
class LedgerState:
    """Balances, stakes and burned credits after folding some events."""

    genesis: Genesis
    balances: dict[str, int] = field(default_factory=dict)
    stakes: dict[str, int] = field(default_factory=dict)
    burned: int = 0
    slashed: dict[str, int] = field(default_factory=dict)  # peer -> total slashed
    #: peer -> reporter rewards received for fault proofs (what an account's reconciliation
    #: needs: the entries carry no amount, the fold computes it)
    rewards: dict[str, int] = field(default_factory=dict)
    slashed_claims: set[str] = field(default_factory=set)
    ineffective: list[str] = field(default_factory=list)  # entry IDs with no effect
    receipts: int = 0
    volume: int = 0  # nano-credits moved by receipts
    last: tuple[float, int, str] | None = None  # sort key of the last event applied
    #: Late entries of finalised epochs, applied after everything else (see the module doc).
    pending: list[Event] = field(default_factory=list)
    #: epoch -> ID of the checkpoint that finalised it
    final_epochs: dict[int, str] = field(default_factory=dict)
    #: the epoch being walked and the entry IDs its final checkpoint lists (None: not final)
    context: tuple[int, frozenset[str] | None] | None = None
    late: int = 0  # late entries applied by :meth:`finished`

    def __post_init__(self) -> None:
        if not self.balances:
            self.balances = dict(self.genesis.allocations)

    def apply(self, event: Event) -> None:
        """Apply one event (callers apply events in sort order)."""
        params = self.genesis.params
        balances = self.balances
        if event.kind == "receipt":
            if event.amount > balances.get(event.payer, 0) + self.credit_limit(event.payer):
                self.ineffective.append(event.entry_id)
            else:
                balances[event.payer] = balances.get(event.payer, 0) - event.amount
                balances[event.payee] = balances.get(event.payee, 0) + event.amount
                self.receipts += 1
                self.volume += event.amount
        elif event.kind == "transfer":
            if event.amount > balances.get(event.payer, 0):
                self.ineffective.append(event.entry_id)
            else:
                balances[event.payer] -= event.amount
                balances[event.payee] = balances.get(event.payee, 0) + event.amount
        elif event.kind == "stake":
            if event.amount < params.min_stake or event.amount > balances.get(event.payer, 0):
                self.ineffective.append(event.entry_id)
            else:
                balances[event.payer] -= event.amount
                self.stakes[event.payer] = self.stakes.get(event.payer, 0) + event.amount
        elif event.kind == "fault":
            if event.claim in self.slashed_claims:
                self.ineffective.append(event.entry_id)
            else:
                self.slashed_claims.add(event.claim)
                stake = self.stakes.get(event.payer, 0)
                slash = stake * params.slash_bps // 10_000
                # No payee: the reporter was not the requester, and the whole slash burns.
                reward = slash * params.reporter_bps // 10_000 if event.payee else 0
                self.stakes[event.payer] = stake - slash
                if event.payee:
                    balances[event.payee] = balances.get(event.payee, 0) + reward
                    self.rewards[event.payee] = self.rewards.get(event.payee, 0) + reward
                self.burned += slash - reward
                self.slashed[event.payer] = self.slashed.get(event.payer, 0) + slash
        self.last = (event.at, event.rank, event.entry_id)

    def follows(self, event: Event) -> bool:
        """True if ``event`` sorts after everything walked so far."""
        return self.last is None or (event.at, event.rank, event.entry_id) > self.last

    def credit_limit(self, peer: str) -> int:
        """How far below zero ``peer``'s balance may go."""
        params = self.genesis.params
        if params.credit_backing == "stake":
            return min(params.credit_limit, self.stakes.get(peer, 0))
        return params.credit_limit

    def spendable(self, peer: str) -> int:
        """What ``peer`` may still spend on work: balance plus credit limit."""
        return self.balances.get(peer, 0) + self.credit_limit(peer)

    def weight(self, peer: str) -> int:
        """``peer``'s say in checkpoints: its stake net of any debt. Stake bought with credit
        (a balance below zero) carries no weight, so debt cannot buy a quorum."""
        return max(0, self.stakes.get(peer, 0) + min(0, self.balances.get(peer, 0)))

    def total_weight(self) -> int:
        """The sum of every peer's :meth:`weight`."""
        return sum(self.weight(peer) for peer in self.stakes)

    def size(self) -> int:
        """How many items :meth:`copy` duplicates (what a copy costs, in time and memory)."""
        return (
            len(self.balances)
            + len(self.stakes)
            + len(self.slashed)
            + len(self.rewards)
            + len(self.slashed_claims)
            + len(self.ineffective)
            + len(self.pending)
            + len(self.final_epochs)
        )

    def copy(self) -> LedgerState:
        """An independent copy (the ledger keeps one as a snapshot)."""
        return LedgerState(
            genesis=self.genesis,
            balances=dict(self.balances),
            stakes=dict(self.stakes),
            burned=self.burned,
            slashed=dict(self.slashed),
            rewards=dict(self.rewards),
            slashed_claims=set(self.slashed_claims),
            ineffective=list(self.ineffective),
            receipts=self.receipts,
            volume=self.volume,
            last=self.last,
            pending=list(self.pending),
            final_epochs=dict(self.final_epochs),
            context=self.context,
        )

    # -- the walk with finality --------------------------------------------------------------

    def walk(
        self,
        event: Event,
        checkpoints: Mapping[int, Sequence[CheckpointLeaves]],
    ) -> None:
        """Take the next event in sort order: apply it in place, or defer it as late."""
        epoch = int(event.at // self.genesis.params.epoch_seconds)
        if self.context is None or self.context[0] != epoch:
            final = self.finality(epoch, checkpoints.get(epoch, ()))
            self.context = (epoch, None if final is None else final.leaves)
            if final is not None:
                self.final_epochs[epoch] = final.entry_id
        leaves = self.context[1]
        # In a final epoch a fault proof that rewards nobody is always late: were it listed
        # and the requester's own proof of the same answer not, it took effect in place and
        # left the requester's nothing to slash (its rank puts it after the requester's only
        # in one class; a hostile review, 2026-12-06). Late, the requester's proof comes
        # first, in place or late, and the other then finds the answer slashed.
        if leaves is not None and (
            event.entry_id not in leaves or (event.kind == "fault" and not event.payee)
        ):
            self.pending.append(event)
            key = (event.at, event.rank, event.entry_id)
            self.last = key if self.last is None or key > self.last else self.last
            return
        self.apply(event)

    def finality(
        self, epoch: int, candidates: Sequence[CheckpointLeaves]
    ) -> CheckpointLeaves | None:
        """The checkpoint that finalises ``epoch`` now: the heaviest (then smallest ID) of those
        whose signers hold the quorum of checkpoint weight; None if none does."""
        total = self.total_weight()
        if not total:
            return None
        quorum = self.genesis.params.quorum_bps
        best: tuple[int, str, CheckpointLeaves] | None = None
        for candidate in candidates:
            weight = sum(self.weight(s) for s in candidate.signers)
            if weight * 10_000 >= quorum * total:
                key = (-weight, candidate.entry_id, candidate)
                if best is None or key[:2] < best[:2]:
                    best = key
        return None if best is None else best[2]

    def finished(self) -> LedgerState:
        """The state with the late entries applied (a copy when there are any)."""
        if not self.pending:
            return self
        done = self.copy()
        late, done.pending = done.pending, []
        for event in late:
            done.apply(event)
        done.late = len(late)
        return done

    def total(self) -> int:
        """Balances + stakes + burned: equals the genesis supply in every reachable state."""
        return sum(self.balances.values()) + sum(self.stakes.values()) + self.burned

    def account(self, peer: str) -> dict[str, int]:
        """One peer's balance, stake and slashed total (nano-credits)."""
        return {
            "balance": self.balances.get(peer, 0),
            "stake": self.stakes.get(peer, 0),
            "slashed": self.slashed.get(peer, 0),
        }


def fold(
    genesis: Genesis,
    events: Iterable[Event],
    checkpoints: Mapping[int, Sequence[CheckpointLeaves]] | None = None,
) -> LedgerState:
    """The state after ``events`` (any order), with ``checkpoints`` (epoch -> verified
    checkpoints) deciding which entries of finalised epochs take effect in place."""
    state = LedgerState(genesis)
    for event in sorted(events):
        state.walk(event, checkpoints or {})
    return state.finished()
