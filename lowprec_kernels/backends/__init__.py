"""Backend kernels, one module (or package) per backend; each registers with ``_dispatch``."""
