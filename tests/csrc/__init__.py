"""The CUDA C++ backend (csrc/): nvcc builds and PTX checks (run here), fragment layouts, and the cuda backend on a GPU (cuda-marked)."""
