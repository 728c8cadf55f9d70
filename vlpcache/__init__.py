"""vlpcache: affordable video-language pretraining on cached region features.

    from vlpcache import Searcher
    s = Searcher(run=..., cache=...)          # index= optional; workspace defaults otherwise
    hits = s.search("person cuts onion", k=10)
"""

__version__ = "0.1.0"

__all__ = ["Searcher", "Hit", "RegionHit", "__version__"]


def __getattr__(name: str):
    # imported on first use, so that `vlpcache --help` and `extract` do not load FAISS and onnxruntime
    if name in ("Searcher", "Hit", "RegionHit"):
        from vlpcache.index import search

        return getattr(search, name)
    raise AttributeError(f"module 'vlpcache' has no attribute {name!r}")
