"""fastssl's reference trainer: SSL pre-training with the fused losses, then frozen-feature evaluation.

`python -m fastssl.train` (fastssl.train.cli) runs it; `train(Config(...))` is the same from Python.
Modules: data (embedded digits, CIFAR pickles, image folders), augment (batched SimCLR augmentations in
pure PyTorch), models (small CNN, CIFAR ResNet-18, projector), losses (the `--loss` registry), engine
(loop, GradCache, LARS, schedule, checkpoints), evaluate (linear probe, k-NN, Huang et al. (2023)'s metrics),
plot and throughput (tools). docs/trainer.md is the user guide.
"""

from fastssl.train.engine import Config, TrainError, train

__all__ = ["Config", "TrainError", "train"]
