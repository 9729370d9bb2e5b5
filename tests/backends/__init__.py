"""Every backend on the CPU: the torch kernels and the Triton kernels under TRITON_INTERPRET=1, ops and losses against the spec."""
