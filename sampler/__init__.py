"""madseg's sampler: score an unlabelled pool once with a target and competitor models, then select
images to label (MAD competition, or the entropy / random baselines).

Modules: :mod:`sampler.pool` (pool entries, content ids, robust reading), :mod:`sampler.store`
(the SQLite score store), :mod:`sampler.score` (``score_pool``), :mod:`sampler.distributed`
(torchrun), :mod:`sampler.candidates` (selection over a store), and the pure logic
:mod:`sampler.metrics`, :mod:`sampler.select`, :mod:`sampler.bounds`, :mod:`sampler.baselines`.
CLI: :mod:`sampler.cli` (``madseg score``, ``madseg select``).
"""
