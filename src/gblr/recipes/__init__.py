"""Training recipes: datasets, reference models and the Lightning engine (extra ``[train]``)."""
