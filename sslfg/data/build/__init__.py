"""Dataset builders, apart from the readers of sslfg.data: the bundled samples (sample, cluttered), CUB's
conversion to the csv layout (cub), and a dataset's pixel statistics for a recipe (stats)."""
