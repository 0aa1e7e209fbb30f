"""An example normzoo plugin: one norm (``mean-bn``) and one probe (``weight-norm``)."""

__version__ = "0.1.0"
