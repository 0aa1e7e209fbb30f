"""timm's normalization layers as normzoo norms (see ``normzoo_timm.plugin``)."""

__version__ = "0.1.0"
