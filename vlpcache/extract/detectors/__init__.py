"""The detectors `extract` runs, from the torch-free description up to the networks:

    spec.py          DetectorSpec: weight files, feature size, input size, provenance (no torch)
    vision_ops.py    torchvision's compiled nms and roi_align, without importing torchvision (1.3 s)
    regions.py       the Detector protocol and the region-selection rules every detector shares
    yolox_graph.py   the YOLOX ONNX graph made batched, with its neck maps as outputs (no torch)
    yolox_torch.py   the YOLOX graph as a torch module (onnx2torch), for the CUDA path
    yolox.py         `yolox`: YOLOX-Nano boxes (onnxruntime, or torch on CUDA) + RoIAlign features
    frcnn.py         `frcnn`: torchvision Faster R-CNN with box-head region features
    choice.py        choose_detector (spec from the command line), load_detector (spec -> Detector)

Each module imports only the ones listed above it. This package imports nothing, so that
`import vlpcache.extract.detectors.spec` stays light.
"""
