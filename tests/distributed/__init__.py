"""gather_distributed with real multi-process gloo launches under DDP."""
