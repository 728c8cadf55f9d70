"""`vlpcache serve`: a local search page and JSON API over the Searcher (index/search.py).

command.py (the command: load, bind, run uvicorn) -> app.py (routes, limits, errors) -> thumbnails.py
(frames decoded from the sources once, kept beside the index); page/ is the page, with no build step.
"""
