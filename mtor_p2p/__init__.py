"""MTOR: a peer-to-peer network that turns idle GPUs into one verifiable compute fabric.

``import mtor_p2p`` gives the peer library. The pieces most embedders need:

* :class:`mtor_p2p.identity.Identity` and :func:`mtor_p2p.identity.load_or_create_identity`
* :class:`mtor_p2p.node.Node`, the peer with its services, started with ``Node.open(config)``
* :class:`mtor_p2p.config.NodeConfig`, the settings of a node
* :class:`mtor_p2p.network.Network`, the port every service talks to
"""

import logging

__version__ = "0.1.0"

# A library logs and its application decides what is shown: without this, Python's last-resort
# handler printed the library's warnings ("no usable GPU: ...") on an embedder's stderr. The
# CLIs configure logging and still show them.
logging.getLogger(__name__).addHandler(logging.NullHandler())
