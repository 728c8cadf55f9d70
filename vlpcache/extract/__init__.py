"""Extraction: items found, sampled, detected and written into the region cache."""


def extract_outside(*args, **kwargs) -> str:
    """extract/outside.py's extract_outside (`search --like FILE`, the page's uploads), that module imported at the
    first call only: the decoders it brings (0.4 s) are no part of every search's or server's start-up."""
    from vlpcache.extract.outside import extract_outside as extract

    return extract(*args, **kwargs)
