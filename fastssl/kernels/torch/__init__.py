"""Chunked PyTorch kernels: the CPU default, same math and O(N·D) memory as the Triton kernels."""
