"""The pipeline stages, one module per notebook. Each is a function of the config (``run(cfg)``)
that builds its artefacts, or reuses them while current, and refuses inputs that are not
(``vcb_lib.manifest``: one freshness rule; ``artefacts``: what depends on what).

=====================  ======================  ===============================================
notebook               module                  builds
=====================  ======================  ===============================================
00_theory              ``theory``              00_theory/checks.json
01_sft_and_reward      ``sft_and_reward``      01_models/: pairs, sft/, reward_model/, metrics
02_generate            ``generate``            02_candidates/candidates.parquet (D_t)
03_train               ``train``, ``online``   03_train/<method>/ (``online``: the on-policy methods' rounds)
04_evaluate            ``evaluate``, ``exact`` 04_eval/<policy>/samples-*.parquet, metrics.json (``exact``: its exact part)
05_analysis            ``analysis``            figures/ (the report: ``vcb_lib.report``)
06_ablations           ``ablations``           sweep and panel points (stages 03-04)
=====================  ======================  ===============================================

Notebooks, ``vcb_lib.sweep`` and ``vcb_lib.widgets`` call these functions, never the layers
under them, for stage work. Adding a stage: a module here, its notebook ``NN_<name>.ipynb`` (the
runner finds it), its artefacts in ``artefacts``.
"""
