"""A seeded synthetic marketplace: the embedded default data set (and the ground truth it plants).

``python -m data.synth --profile {tiny,demo,paper} --workdir DIR --seed N [--label-noise P]
[--scale F] [--force]`` writes ``DIR/data/{catalog,relevance,impressions,purchases}.parquet``
(the contract of :mod:`data.schema`), ``DIR/data/synth_truth.parquet`` (hidden per-impression
truth, row-aligned with ``impressions.parquet``; not part of the contract) and
``DIR/data/manifest.json`` (settings, row counts, click rate, label split, measured CTRs).
Every table is generated in chunks (a day of impressions, a block of queries, a block of
products), validated with :func:`data.schema.validate` and written as fixed-size row groups to a
temporary file; all files are renamed into place only when everything has been written, so a
failed run (a full disk included) leaves the workdir as it was. Memory holds the per-product and
per-user state (O(products + users)), the query counting accumulators (below) and one chunk, never
a whole output table.

The generative model (this is the truth later stages should recover)
====================================================================
Randomness: one ``numpy.random.default_rng(SeedSequence([seed, stream, k]))`` per component
(stream = catalog, brands, users, stores, relevance chunk k, purchases of day k, sessions of day
k), so a run is byte-identical for the same (profile, seed, scale, label noise).

Catalog (:func:`catalog.build_catalog`). The vocabulary (:mod:`data.vocab`) has 24 aisles in 10
aisle groups, 53 type groups, 131 product types and 277 variants. ``n_brands = max(2 * aisles,
products // 12)`` invented brands; every aisle gets at least two, the rest are spread by aisle
weight; a brand has a popularity ``LogNormal(0, 0.8)``, a price tier ``N(0, 0.2)``, a label
colour and makes 1-4 of its aisle's types. A product draws aisle (vocabulary weight) -> brand
(popularity, within the aisle) -> type (uniform over the brand's types) -> variant (uniform in the
type group) -> container, amount, pack count (uniform over the type's options); ``organic`` with
the aisle's organic share. ``price = base(type) * (1 + 0.6 amount_index) * pack^0.85 *
exp(tier + N(0, 0.08)) * (1.3 if organic)``. Popularity ``LogNormal(0, 1) * sqrt(brand
popularity)`` drives every "popular product" draw below; a latent click ``appeal ~ N(0,
ClickModel.appeal_sd)`` is seen by no column.
Title: ``"{Brand} [Organic ]{Type}[ {Variant}] {pack} x {amount} {Containers}"``
(e.g. "Fizzly Cola Zero Sugar 12 x 12 fl oz Cans"). Image-only facts: the variant is left out of
the title for ``variant_hidden_share`` (30%) of products, but the packshot body always has the
variant's colour; "Organic" is left out of the title for ``organic_image_only_share`` (50%) of
organic products, but every organic packshot has a green badge (:mod:`data.packshot`).

Queries (:func:`queries.sample_intents`, :func:`queries.render_queries`). A query comes from a
target product and an intent kind (``Behaviour.intent_kind_probs``): type 16%, brand+type 28%,
type+variant 16%, brand+type+variant 14%, brand 10%, aisle 16%; an organic target turns into
organic+type with probability ``organic_query_share`` (40%). The intent keeps the target's attributes of that
kind. Its text uses a type/aisle synonym (45%), a relevance-neutral modifier ("bulk", "near me",
"12 pack", 45%; a second one for 25% of those), swapped word order (20%), one misspelt word
(dropped, swapped or doubled letter, 12%) and an initial capital (15%). No noun (type or aisle
name/synonym) belongs to two types or aisles. The surface forms make a long tail: in ``demo``
about half the eval-week impressions carry a query never seen before it (the manifest records
this share), so memorising (query, product) pairs does not work, while the words generalise.

Relevance label of (intent, product) (:func:`queries.relevance_labels`), the single rule used for
the relevance table and for the clicks:
  * HR (2): the product meets every attribute of the intent (brand, type, variant, organic;
    an aisle intent: the product is in that aisle).
  * MR (1): otherwise, if the intent has a type: the product's type is in the same type group
    (same type other brand/variant, or a related type: cola vs root beer); a brand-only intent:
    the product is of a type the brand makes (a competitor's product); an aisle intent: the
    product's aisle is in the same aisle group (drinks vs alcohol).
  * IR (0): everything else.
Relevance table (:func:`relevance.relevance_batches`): ``n_relevance_queries`` distinct query
texts (normalised), drawn like search queries from popular (70%) or uniformly chosen (30%) target
products; per query
``ceil(1.6 * pairs_per_query)`` candidates from the exact pool (15%), the near pool (30%: same
type group / brand's aisle / aisle group) and popular products (55%), deduplicated, labelled by
the rule, then subsampled per chunk to ``pairs_per_query`` pairs per query on average in the
split IR 69.6 / MR 20.5 / HR 9.9 %. ``--label-noise p``: each label flips with probability p to an adjacent grade
(HR->MR, IR->MR, MR->HR or IR with equal odds), imitating LLM label noise; the manifest records
the split before and after.

Users (:func:`users.build_users`). ``users_without_purchases`` (30%) never buy. Every user has three
favourite aisles (Gumbel top-3 by aisle size; slot weights 0.55/0.3/0.15), five favourite
brands (popular brands of those aisles), four staple products (popular products of those
brands), a price sensitivity ``N(0.4, 0.25)`` clipped at 0, a home store, a main platform and a
search activity ``Gamma(1, 1)``. Buyers place ``Poisson(rate)`` orders a day, ``rate = Gamma(2)``
around ``mean_orders_per_user / n_days``; an order has ``1 + Poisson(1.5)`` items: a staple (35%),
a favourite-brand product (35%) or a favourite-aisle product (30%).

Impressions (:func:`simulate.simulate_day`), day by day over ``n_days`` from ``start_date``: a day has
``Poisson`` sessions (weekends x1.15); a session is (user ~ activity, time ~ hour profile, store:
home 80%, platform: main 85%) and a query from a target product (favourite brand 25%,
favourite aisle 55%, popular product 20%). It shows ``U{4..8}`` ad candidates, each from the
intent's exact pool (22%), near pool (28%), same aisle (25%) or any popular product (25%),
deduplicated; positions 0..k-1 by an auction score ``N(0, 1) + 0.5 * label``. A candidate is
clicked with ``p = sigmoid(logit)``,

    logit = intercept + relevance_mr [MR] + relevance_hr [HR]
            + history_aisle [user bought the candidate's aisle in [ts - 84 d, ts)]
            + history_brand [... its brand ...] + history_product [... this product ...]
            + position_log1p * log(1 + position) + appeal(product) + store_effect(store)
            + platform[platform] + evening [18-21 h] + night [0-5 h] + weekend [Sat, Sun]
            + discount * dense_discount - price_sensitivity(user) * price_z(product)

with the :class:`config.ClickModel` defaults (intercept -5.45, MR +1.1, HR +2.3, history aisle +1.2,
brand +1.6, product +2.0, position -0.5 per log(1+pos), appeal sd 0.4, store sd 0.15,
platform ios 0 / android +0.1 / web -0.2, evening +0.2, night -0.2, weekend +0.1, discount +2.0
per unit, price_z = log price standardised within the product type). The history terms can
only fire for users with purchases; they are strong enough that the purchase history explains more
of a buyer's clicks than the query-product match adds for a user without history (the paper's Table 2
shape, with the counting features in the baseline). In ``demo`` (seed 0) this gives an overall CTR of
about 5.6%, candidates about 37% IR / 29% MR / 34% HR with CTR about 0.8% / 4.1% / 12.2%, and for
buyers a CTR of about 15.6% when the candidate's aisle was bought in the last 84 days vs 1.4% when not.
Features (what a baseline without query text sees): ``dense_price`` (list price),
``dense_discount`` (0 for 80% of impressions, else 0.1..0.3), ``dense_hour``,
``dense_product_ctr_past`` = (clicks + 20 * 0.04) / (impressions + 20) of the product over all
*earlier days* (never the same day), ``sparse_store``, ``sparse_aisle``, ``sparse_brand``,
``sparse_platform``, ``sparse_product`` (= product_id), ``sparse_hour_bucket`` (hour // 4),
``sparse_weekday`` (Monday = 0).

Query counting features (default; ``--no-query-counts`` leaves them out, and then the impressions
are those of generator version 1): what a production ranker knows about a query from its own
logs. For each level L in (query, (query, product), (query, aisle)), with the query keyed by
:func:`data.text.normalize_query` and counts over every impression of *earlier days* (strictly
before the impression's day: never the same day or later),
``dense_L_ctr_past = (clicks_L + 20 * 0.04) / (impressions_L + 20)`` (the same smoothing as the
product CTR: 20 pseudo-impressions at the prior ``ClickModel.ctr_prior``) and
``dense_L_log_impressions_past = log(1 + impressions_L)``; columns ``dense_query_*``,
``dense_query_product_*``, ``dense_query_aisle_*``. A query never seen on an earlier day gets
the prior and 0 at every level. They are computed day by day (:class:`counting.QueryCountFeatures`:
sorted int64 keys with int32 counts, a query's key being a dense code of its 64-bit text hash):
16 bytes per distinct query and per distinct key of each level, at most 64 bytes per impression
of the whole period, in practice less (``query_count_keys`` in the manifest counts them; demo:
42k queries, 354k (query, product) and 130k (query, aisle) keys: 9.1 MB).

Relevance depends on the query text, which the features only see through the counts of queries
already seen (about half the eval-week impressions in ``demo`` carry a query never seen before);
the history terms depend on the purchases table, which they lack; appeal is learnable only
through ``sparse_product`` and the past CTR.

``synth_truth.parquet`` (row-aligned with impressions): true_label, hist_aisle, hist_brand,
hist_product, intent_kind, candidate_source, appeal, click_prob.

``synth_relevance_truth.parquet`` (relevance schema): for the first ``complete_label_queries``
relevance queries (2000; none in ``paper``), every MR/HR product of the catalog with its
noise-free label. The relevance table judges ~20 products per query; with this file
``embeddings.evaluate`` also scores full-catalog retrieval with complete judgments.

Modules
=======
One module per concern; the package itself exposes only the command's entry points
(:func:`main`, :func:`generate`, :class:`SynthArgs`) and the profiles (:data:`PROFILES`).

* :mod:`data.synth.config`: ``ProfileConfig`` and ``PROFILES``, ``Behaviour``, ``ClickModel``,
  the hour-of-day profile.
* :mod:`data.synth.sampling`: the seeded random streams, ``GroupedSampler``, categorical draws.
* :mod:`data.synth.catalog`: brands and products, titles, the catalog table with its packshots.
* :mod:`data.synth.queries`: intents, query texts and their hashes, the relevance rule, the
  candidate pools of an intent.
* :mod:`data.synth.relevance`: the relevance table and the complete judgments.
* :mod:`data.synth.users`: latent user state, the products users pick, the time of day.
* :mod:`data.synth.history`: a day's purchases and the 84-day purchase history.
* :mod:`data.synth.counting`: the smoothed CTR and the query counting features.
* :mod:`data.synth.simulate`: a day's sessions, ad candidates and clicks, as tables.
* :mod:`data.synth.generate`: the command, the validating table sinks, publishing and the
  manifest; ``__main__`` runs it for ``python -m data.synth``.
"""
from __future__ import annotations

from data.synth.config import PROFILES
from data.synth.generate import SynthArgs, generate, main

__all__ = ["PROFILES", "SynthArgs", "generate", "main"]
