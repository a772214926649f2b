"""jax.export of functions that call this package's CUDA kernels.

A lowering for the cuda platform holds two FFI custom calls (the schedule and the decode). JAX serializes only
custom calls whose targets it guarantees to stay compatible, so `jax.export.export` refuses these unless told
that the caller takes that on: `disabled_checks=jax_flashmla.export_disabled_checks()`. The artifact then calls
the targets by name, and the process that runs it must have them registered, by importing jax_flashmla of the
same version: their operands and attributes may change between versions. Lowerings for other platforms hold
the pure-JAX reference and need nothing.
"""

from __future__ import annotations

from jax import export

from ._extension import DECODE_TARGET, METADATA_TARGET


def export_disabled_checks() -> list:
    """The `disabled_checks` for `jax.export.export` of a function that calls flash_mla_with_kvcache or
    get_mla_metadata, for the cuda platform (alone or among others)."""
    return [export.DisabledSafetyCheck.custom_call(target) for target in (METADATA_TARGET, DECODE_TARGET)]
