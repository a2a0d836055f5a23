"""``python -m mtor_p2p`` is ``mtor-peer``."""

import sys

from mtor_p2p.cli import main

sys.exit(main())
