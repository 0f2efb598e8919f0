"""Adapters that turn real public data sets into the four tables of the on-disk contract.

``python -m data.adapters.<name> --source PATH --workdir DIR [--seed 0] [--force]`` with
``<name>`` one of ``fashion`` (Fashion Product Images: real photos, proxy relevance, no clicks),
``instacart`` (593 users' complete order histories: next-order ranking) and ``completejourney``
(dunnhumby The Complete Journey: a year of baskets and weekly promotions). Each writes
``DIR/data/{catalog,relevance,impressions,purchases}.parquet`` and ``DIR/data/manifest.json``
with the source, the settings, the derivation rules and ``"proxy_labels": true``.
"""
