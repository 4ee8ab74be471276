"""clrface: blind face restoration by conditional latent refinement (CLR-Face, Suin & Chellappa)."""

__version__ = "0.1.0"
