"""madseg's sampler: score an unlabelled pool once with a target and competitor models, then select
images to label (MAD competition, or the entropy / random baselines).

Modules: :mod:`sampler.pool` (pool entries, content ids, robust reading), :mod:`sampler.store`
(the SQLite score store), :mod:`sampler.score` (``score_pool``), :mod:`sampler.distributed`
(torchrun), :mod:`sampler.candidates` (the ``Candidate`` record, ``candidates.jsonl`` and the
selection entry points ``madseg select`` and ``madseg round`` share), and the pure logic
:mod:`sampler.metrics`, :mod:`sampler.select`, :mod:`sampler.bounds` (the per-class size-bound
rule), :mod:`sampler.order` (the order raters see M in), :mod:`sampler.baselines`.
CLI: :mod:`sampler.cli` (``madseg score``, ``madseg select``).
"""
