"""How ``normzoo report`` presents each of these probes (their ``report`` class attribute names a class here).

Imported only when a report or a sweep.csv is written; the figures draw with the helpers the report hands them,
so nothing here imports matplotlib or torch.
"""
