"""vlpcache: affordable video-language pretraining on cached region features.

    from vlpcache import Searcher
    s = Searcher(run=..., cache=...)          # index= optional; workspace defaults otherwise
    hits = s.search("person cuts onion", k=10)
    like = vlpcache.like_file(s, "clip.mp4")  # the items most like a clip, held by the cache or not
"""

__version__ = "0.1.0"

__all__ = ["Searcher", "Hit", "RegionHit", "like_file", "__version__"]


def like_file(searcher, path, k: int = 10, device: str = "auto", say=None):
    """The items of `searcher`'s index most like a video, photo or frames folder (`vlpcache search --like FILE`):
    a file or folder the cache holds is its item's hits (Searcher.like); one it does not hold, or one it holds
    that changed since it was extracted (said in a line), is extracted on its own, with the cache's settings, into
    a temporary cache (nothing added), then ranked the same way.
    `say`: where its line goes (default: stderr; `lambda line: None` for none)."""
    import functools
    import os

    from vlpcache import report
    from vlpcache.errors import UserError, user_message
    from vlpcache.extract.stamps import source_changed
    from vlpcache.index.search import check_k, like_outside, liked_item, names_a_file

    check_k(k)
    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"like_file takes the path of a video, photo or frames folder (str or Path), not "
                        f"{type(path).__name__}")
    path = os.fspath(path)
    try:
        item_id, was = liked_item(path, searcher, outside=True, changed=source_changed)
    except UserError as err:
        if os.path.exists(path) or names_a_file(path):  # a path's line says it is no file already
            raise
        raise UserError(f"{report.printable(path)}: no such file or folder, and {user_message(err)}") from None
    if item_id is not None:
        return searcher.like(item_id, k)
    from vlpcache.extract.outside import extract_outside

    # decoded in this process: a spawned worker would run a calling script's top-level code again (no main guard)
    return like_outside(searcher, path, k, functools.partial(extract_outside, workers=0), device, say or report.say,
                        changed_from=was)


def __getattr__(name: str):
    # imported on first use, so that `vlpcache --help` and `extract` do not load FAISS and onnxruntime
    if name in ("Searcher", "Hit", "RegionHit"):
        from vlpcache.index import search

        return getattr(search, name)
    raise AttributeError(f"module 'vlpcache' has no attribute {name!r}")
