"""The Triton backend for GPUs: compiled ahead of time for sm_90/sm_80 (runs here), and run on a real GPU (cuda-marked)."""
