"""Triton kernels. Imported only when triton is importable; see ivg_kernels._backend."""
