"""viewpipe: contrastive-learning views at GPU speed — the core, importable without DALI or FFCV.

- `viewpipe.state.SampleState`: per-sample boxes, heatmaps and neighbours in shared memory, read live by loaders.
- `viewpipe.crop`: the ContrastiveCrop window sampler (NumPy, vectorised over a batch).
- `viewpipe.boxes`: heatmap → box, the ContrastiveCrop box update.
- `viewpipe.augment`: batched crop-resize and photometric augmentation (`Augmenter`): fused Triton kernels on
  the GPU, torch ops (`viewpipe.torch_ops`) on the CPU, the same views from the same seed.
- `viewpipe.convert`: folders and `.npz` collections to DALI shards and an FFCV file; `viewpipe.verify` checks them.
- `viewpipe.sources`: image folders and `.npz` JPEG collections addressed by sample index.
"""

__version__ = "0.1.0"
