"""Dataset families: importing each module registers its datasets (keep this a plain list of imports)."""

from dinocell.data.datasets import (  # noqa: F401
    ct,
    hf,
    image_folder,
    jump,
    single_cell,
    spectral_cubes,
    synthetic,
    synthetic_hyperspectral,
)
