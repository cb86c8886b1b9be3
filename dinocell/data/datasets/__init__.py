"""Dataset families: importing each module registers its datasets (keep this a plain list of imports)."""

from dinocell.data.datasets import image_folder, synthetic  # noqa: F401
