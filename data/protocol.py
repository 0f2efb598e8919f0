"""The time protocol that the data generators and the ranking stage share.

* ``HISTORY_DAYS``: a user's purchase history as of time ``ts`` is their purchases with
  ``ts - HISTORY_DAYS days <= purchase_ts < ts`` (strictly before: no leakage). :mod:`data.synth`
  plants its history-match click effects over this window; the ranking stage builds the history
  bag over it (:class:`ranking.spec.PurchaseIndex`, ``FeatureSpec.history_days``) and splits the
  evaluation week into ``nw_hist`` / ``nw_nohist`` by it (:mod:`ranking.metrics`).
* ``EVAL_DAYS``: the evaluation week ("NW") is the last ``EVAL_DAYS`` days of impressions; every
  ranking model trains on the earlier ones (:mod:`ranking.features`). :mod:`data.synth` reports
  its statistics of unseen queries and the ``eval_week_start`` of its manifest on the same split.
* ``DAY_S``: seconds in a day (timestamps are whole seconds since 1970, UTC).
"""
from __future__ import annotations

DAY_S = 86_400
HISTORY_DAYS = 84
EVAL_DAYS = 7
