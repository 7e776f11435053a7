"""Plain-torch references: the specification, the CPU implementation and the test oracle."""
from .philox import gumbel_noise, philox4x32, philox_uniform
from .sampling import guided_sample_ref

guided_sample = guided_sample_ref

__all__ = ["guided_sample", "guided_sample_ref", "gumbel_noise", "philox4x32", "philox_uniform"]
