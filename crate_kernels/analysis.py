"""The white-box measurements under their earlier name (README's ``from crate_kernels import analysis``): see
``crate_kernels.whitebox``."""
from .whitebox import *  # noqa: F401,F403
