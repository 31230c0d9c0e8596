# diffgrad::torch: the LibTorch adapter (include/diffgrad/torch/). Placeholder until the
# adapter lands: no target is defined, so nothing depends on LibTorch.
