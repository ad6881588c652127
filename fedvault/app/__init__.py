"""The applications, above both sides: what people run.

The ``fedvault`` command line (:mod:`~fedvault.app.cli`), the local demo
consortium (:mod:`~fedvault.app.demo`), the researcher's simulation
(:mod:`~fedvault.app.simulation`), provisioning of a consortium's kits
(:mod:`~fedvault.app.provision`), the operator's client and status view
(:mod:`~fedvault.app.operator_client`, :mod:`~fedvault.app.status_view`) and
model export (:mod:`~fedvault.app.model_export`, :mod:`~fedvault.app.model_card`).
They may import the coordinator and the client; nothing below imports them.
"""

from __future__ import annotations

__all__: list[str] = []
