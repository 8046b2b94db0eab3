"""The Flower ClientApp of fedge: Flower glue only; the work is in ``fedge.client.site``.

One ClientApp serves the plain and the secure path. SecAgg+ and DP clipping
are Flower mods that act only when the server's round asks for them, so the
same code trains in both. torch is imported lazily: SecAgg+'s key-exchange
stages run in a fresh process per message and need no model.
"""

from typing import Any

import numpy as np
from flwr.app.message_type import MessageType
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.common import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedge.shared.config import RunConfig

# Key Flower's server-side DP wrapper puts in the fit config when clients must clip.
_CLIPPING_KEY = "clipping_norm"


class SiteClient(NumPyClient):
    """Unpacks Flower's fit/evaluate calls, delegates to ``Site``, packs the reply."""

    def __init__(self, context: Context) -> None:
        from fedge.client.policy import SiteGuard

        self.cfg = RunConfig.from_flower(dict(context.run_config))
        self.node_config = dict(context.node_config)
        # The site's own policy and ledger: checked before the site's data is loaded.
        self.guard = SiteGuard.for_node(self.node_config, str(context.run_id))

    def _site(self) -> Any:
        from fedge.client.site import Site

        return Site(self.cfg, self.node_config)

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        self.guard.check_run(self.cfg)
        if self.cfg.job == "artifacts":
            # Export's federated job (counts only); consulted as a federated evaluation.
            from fedge.client.artifact_job import answer

            self.guard.check_evaluate()
            return answer(self.cfg, self.node_config, parameters, config)
        site = self._site()
        site.guard = self.guard
        return site.fit(parameters, config)

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        self.guard.check_run(self.cfg)
        self.guard.check_evaluate()
        return self._site().evaluate(parameters, config)


def client_fn(context: Context) -> Any:
    return SiteClient(context).to_client()


def _secaggplus_when_asked(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Run Flower's SecAgg+ mod only for rounds the server runs with SecAgg+."""
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    ):
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def _clipping_when_asked(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Run Flower's fixed-clipping mod when the server's DP wrapper sends a clipping norm."""
    if msg.metadata.message_type == MessageType.TRAIN and any(
        _CLIPPING_KEY in record for record in msg.content.config_records.values()
    ):
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


# SecAgg+ outermost: it masks what the clipping mod returns (clip on the site, then mask).
app = ClientApp(client_fn=client_fn, mods=[_secaggplus_when_asked, _clipping_when_asked])
