"""vlpcache: affordable video-language pretraining on cached region features."""

__version__ = "0.1.0"
