"""The error detection's data checks raise: a leaf module, so the loaders that raise it (data.py,
voc.py) import it rather than each other."""


class DetectionDataError(ValueError):
    """An annotation file or image directory that does not fit the recipe."""
