"""normzoo-probes: the papers' measurements (ICS, loss landscape, Hessian, activations, ...) as normzoo plugins.

The core never imports this package by name; it is found through the ``normzoo`` entry-point group
(``normzoo_probes.plugin``), exactly like a third-party plugin.
"""

__version__ = "0.1.0"
