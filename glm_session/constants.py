"""Constants shared by the data and the model side."""

IGNORE_INDEX = -100
"""Label of a position that is not trained (PyTorch's ``cross_entropy`` default ``ignore_index``)."""
