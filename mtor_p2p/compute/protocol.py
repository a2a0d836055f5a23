"""Names and limits of the compute protocols, shared by worker and requester.

Every message is ``arrays.pack(header, body)``. Operands travel in chunks of at most
:data:`CHUNK_BYTES`; one request or response never exceeds :data:`MAX_MESSAGE_BYTES`.
Messages with array bytes in their body (upload chunks, run requests carrying operands, run
answers, download chunks) may carry a header field ``~pad`` of spaces, which places the body
at a multiple of 16 bytes in the message (``arrays.pack_gathered``); receivers ignore it, as
they ignore every field they do not read.

``/mtor/compute/upload/1``   header {array, offset}; body: a chunk.   → {complete, received,
                             window}: ``received`` is where this chunk ends; ``window`` how
                             many chunks of one upload the sender may have in flight (a
                             chunk ahead of its turn waits for the ones before it, within the
                             window). Workers before windows send no ``window`` and refuse a
                             chunk that is not at the offset they expect: they get one chunk
                             at a time.
``/mtor/compute/upload-local/1`` header {array, host, pid, fd}     → {complete, received}: the
                             operand is in the requester's sealed memfd ``fd`` of process
                             ``pid`` on the worker's own machine (``host``: its boot ID and
                             PID namespace hashed with both peer IDs; the memfd is named for
                             the array's hash); the worker maps and hashes it instead of
                             taking chunks (mtor_p2p/compute/local_share.py). A worker on another
                             machine answers NOT_LOCAL and gets chunks from then on; one that
                             cannot use it answers another error and gets chunks this time.
``/mtor/compute/has/1``      header {hashes: [...]}                   → {have: [...]}
``/mtor/compute/run/1``      header {job_id, shard, kernel, operands: {name: array}, max_price,
                             wait_operands, ledger_rules, network}
                             ``network``: the requester's network, its genesis hash's first
                             16 hex digits. A worker of another network answers
                             NETWORK_REFUSED, naming both (absent: not checked, as every
                             version before the field).
                             ``ledger_rules``: the ledger rules the requester follows
                             (mtor_p2p.ledger.names.LEDGER_RULES; absent: 1, as every
                             version before the field). A worker of other rules answers
                             RULES_REFUSED: the receipt would be paid in a ledger it never
                             hears. (Workers before the field ignore it; requesters after it
                             do not schedule them, since their capacity records, of schema
                             2 or older, state rules 1.)
                             → header {output: array, receipt: b64 worker-signed receipt}
                               and, if the output fits one chunk, the output bytes as body.
                             With ``wait_operands: true`` the request may travel beside the
                             uploads of its operands: the worker waits for operands being
                             uploaded by the sender (and 2 s for an upload to start) instead
                             of answering "missing operands" at once.
                             ``inline: [name, ...]`` (optional): those operands' bytes follow
                             the header as the body, in that order, each exactly as long as
                             its description says, at most INLINE_OPERAND_BYTES in all; the
                             worker checks each against its hash and keeps the ones its kernel
                             keeps resident, as if uploaded. A body without ``inline`` is
                             refused. A run carrying operands never waits for others: what
                             it lacks is "missing operands" at once. Over the worker's cap of
                             carried bytes in runs under way, the answer is INLINE_REFUSED.
                             (Workers before this field refuse such a request as "request
                             too large": the requester then uploads instead.)
``/mtor/compute/download/1`` header {hash, offset, length}            → body: a chunk
``/mtor/compute/download-local/1`` header {hash, host}              → {pid, fd}: the output
                             ``hash`` of one of the sender's runs, too large for the run's
                             answer, is in the worker's sealed memfd ``fd`` of process
                             ``pid`` (named for the hash and the worker; ``host`` as for
                             upload-local); the requester maps it and hashes it instead of
                             downloading chunks. A worker on another machine answers
                             NOT_LOCAL; a requester that cannot use the copy downloads it.
``/mtor/compute/countersign/1`` header {receipt: b64 complete receipt} → {stored}
                             or header {receipts: [byte sizes]} + body: up to
                             MAX_COUNTERSIGN_BATCH complete receipts one after another
                             → {stored: [one bool each]}. (A worker before batches
                             refuses the second form: "header field 'receipt' missing";
                             the requester then delivers to it one by one.)
"""

from __future__ import annotations

PROTOCOL_UPLOAD = "/mtor/compute/upload/1"
PROTOCOL_UPLOAD_LOCAL = "/mtor/compute/upload-local/1"
PROTOCOL_HAS = "/mtor/compute/has/1"
PROTOCOL_RUN = "/mtor/compute/run/1"
PROTOCOL_DOWNLOAD = "/mtor/compute/download/1"
PROTOCOL_DOWNLOAD_LOCAL = "/mtor/compute/download-local/1"
PROTOCOL_COUNTERSIGN = "/mtor/compute/countersign/1"

CHUNK_BYTES = 4 << 20
#: Countersigned receipts delivered to a worker in one request, at most (about 700 bytes
#: each: 32 fit the worker's 64 KiB request limit with room to spare).
MAX_COUNTERSIGN_BATCH = 32
#: And at most this many bytes of receipts (a receipt may have up to 4 KiB).
MAX_COUNTERSIGN_BATCH_BYTES = 48 * 1024
#: How a worker from before batches refuses one: it looks for the single form's field.
OLD_COUNTERSIGN_REFUSAL = "header field 'receipt'"
MAX_MESSAGE_BYTES = CHUNK_BYTES + 64 * 1024
#: Operand bytes a run request may carry (``inline``): a shard whose missing operands fit
#: travels as one message instead of a run request and an upload per operand (each a request
#: and an answer on both peers' event loops).
INLINE_OPERAND_BYTES = CHUNK_BYTES
#: Largest run request: its header and its inline operands.
MAX_RUN_REQUEST_BYTES = MAX_MESSAGE_BYTES
#: How a worker refuses a run request's inline operands it will not hold now (over its cap of
#: bytes held by runs in progress): not a fault; the requester uploads them instead.
INLINE_REFUSED = "inline operands refused"
#: Largest single operand or output a worker accepts.
MAX_ARRAY_BYTES = 1 << 30
#: Uploads in progress per worker, all peers together: the bytes their first chunks announced
#: are reserved at once, so that uploads which start empty cannot pass the cap as they grow.
MAX_PENDING_UPLOAD_BYTES = 2 << 30
#: One sender's share of that reservation: enough for the largest operand, and never all of
#: it, so that one peer alone cannot lock every other requester out ("busy").
MAX_PENDING_UPLOAD_BYTES_PER_PEER = MAX_PENDING_UPLOAD_BYTES // 2
#: Of those, the bytes a worker keeps in memory rather than spooling them to disk (all peers
#: together; one peer at most half): spooling cost 3-5 times the CPU (see _UploadBuffer).
MAX_UPLOAD_MEMORY_BYTES = 1 << 30

#: Why a worker that refused this requester's network is out of a job (the refusal follows),
#: as a job summary's ``workers_out`` says it.
OTHER_NETWORK_OUT = "of another network"
#: How the reasons of workers out for a refusal that is no fault begin (the peer book has
#: nothing on them): another network, and "refused: ..." (our credit, a stale quote, other
#: ledger rules). The CLI reads summaries of nodes that do not count them by these.
NO_FAULT_OUT = (OTHER_NETWORK_OUT, "refused:")
