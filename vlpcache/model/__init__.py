"""Model and pretraining stage: cached regions + captions -> a joint video-text space.

    model.py       ModelConfig, text encoder, region encoder, AlignmentModel, PretrainLoss, build_model
    losses.py      InfoNCE (all-gathered under DDP), region-word alignment, region_word_score, rerank_score
    batch.py       video_batch, tokenize: model inputs from cache items and captions
    data.py        captioned-region dataset over several caches, caption discovery, validation set
    text_features.py  a frozen text encoder's outputs, computed once per captions
    retrieval.py   encoding of videos and texts, candidate S_loc: shared by validation, index and eval
    train.py       run_pretrain: the training loop (`vlpcache pretrain`, torchrun for DDP)
    checkpoint.py  atomic checkpoints, load_run for index/search/eval
    run_layout.py  the run directory's files and checkpoint lookup, without torch (search reads it)
    inspect_run.py `vlpcache inspect RUN` / `--runs`: a run's settings, state and epochs, without torch

Import the submodules directly; this package imports nothing so that `import vlpcache.model.run_layout`
stays light.
"""
