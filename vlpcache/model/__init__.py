"""Model and pretraining stage: cached regions + captions -> a joint video-text space.

    model.py       ModelConfig, text encoder, region encoder, AlignmentModel, PretrainLoss, build_model
    losses.py      InfoNCE (all-gathered under DDP), region-word alignment, region_word_score, rerank_score
    batch.py       video_batch, tokenize: model inputs from cache items and captions
    data.py        captioned-region dataset over several caches, caption discovery, validation set
    train.py       run_pretrain: the training loop (`vlpcache pretrain`, torchrun for DDP)
    checkpoint.py  run directories: atomic checkpoints, load_run for index/search/eval

Import the submodules directly; this package imports nothing so that `import vlpcache.model.batch`
stays light.
"""
