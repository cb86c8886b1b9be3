"""Dataset families: importing each module registers its datasets (keep this a plain list of imports)."""

from dinocell.data.datasets import ct, hf, image_folder, jump, single_cell, synthetic  # noqa: F401
