"""FLARE's DH-PSI task handler with an exact server set: a Golomb-compressed set, not a Bloom filter.

Why this exists: FLARE 2.9's `PSIServer.setup` always ships the server's blinded items in
OpenMined PSI's Bloom filter, and `DhPSIWorkFlow` asks for a false-positive rate of 1e-11. With
openmined.psi 2.0.6 that filter is far worse than asked: in 800 fresh-key pairwise runs on the
bundled registries where the client holds at least as many IDs as the server (381 against 287, and
381 against 381; fpr 1e-11 and 1e-9), 4 reported an extra patient, about one in 200 (FLARE's own
docstring cites the library's bug, OpenMined/PSI#143). Across the pairwise and backward steps of a
3-site linkage that made about one `psi_linkage` run in six fail FLARE's final size check (seen in
CI as an empty ``psi.per_site``). A false positive is worse than a failed run: it would link a
patient who is not at every site, and `cohort_stats --cohort intersect` would count them.

OpenMined's Golomb-compressed set (``DataStructure.GCS``) honours the rate (0 errors in 600 runs of
the same two cases, and the fixed-key case `tests/unit/test_psi_exact.py` keeps) and is about half
the size of the Bloom filter on the wire. The protocol, the messages and the client side are
unchanged: `ServerSetup` carries either structure and the client's `GetIntersection` reads both.
"""

from __future__ import annotations

import private_set_intersection.python as psi
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import PSIConst
from nvflare.app_opt.psi.dh_psi.dh_psi_client import PSIClient
from nvflare.app_opt.psi.dh_psi.dh_psi_server import PSIServer
from nvflare.app_opt.psi.dh_psi.dh_psi_task_handler import DhPSITaskHandler


class GcsPSIServer(PSIServer):
    """FLARE's `PSIServer`, whose setup message holds a Golomb-compressed set."""

    def setup(self, client_items_size: int) -> bytes:
        setup = self.psi_server.CreateSetupMessage(self.fpr, client_items_size, self.items, psi.DataStructure.GCS)
        return setup.SerializeToString()


class ExactDhPSITaskHandler(DhPSITaskHandler):
    """FLARE's `DhPSITaskHandler`; only the server role's setup changes (see the module docstring).

    `DhPSITaskHandler.setup` builds FLARE's `PSIServer` inline, so the method is restated here with
    `GcsPSIServer`; every other stage (prepare, request, response, intersect) is FLARE's.
    """

    def setup(self, shareable: Shareable, client_name: str) -> Shareable:
        items = self.get_items()
        if len(items) == 0:
            raise RuntimeError(f"site {client_name} doesn't have any items to perform PSI")
        # Every pairwise exchange gets fresh client and server keys (as in FLARE).
        self.psi_client = PSIClient(items)
        self.psi_server = GcsPSIServer(items, self.bloom_filter_fpr)
        result = Shareable()
        if PSIConst.ITEMS_SIZE in shareable:
            result[PSIConst.SETUP_MSG] = self.psi_server.setup(shareable.get(PSIConst.ITEMS_SIZE))
        else:
            sizes = shareable.get(PSIConst.ITEMS_SIZE_SET)
            result[PSIConst.SETUP_MSG] = {str(n): self.psi_server.setup(n) for n in sizes}
        return result
