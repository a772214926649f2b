"""A few decode problems for compute-sanitizer (memcheck, racecheck), run without pytest.

Covers the scheduler, split-KV decode and combine kernels on: varied lengths with an empty sequence, sequences
split over several CTAs, causal s_q > 1, h_kv = 2, head dim 512, a layer read in place from a stacked pool, and
hostile runtime values (lengths past the table up to INT32_MAX, negative lengths, out-of-range and
negative page ids, schedules computed for other lengths or made of arbitrary integers). Each result is also
checked against the reference, except those of the hostile schedules, which are undefined.
Usage: python scripts/sanitize_cases.py [small]
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import test_gpu_kernels as cases  # noqa: E402

SEED = 1234


def main(small: bool):
    # Each case is announced, so a sanitizer report (printed after its kernel) can be traced to one.
    print("case: hostile runtime values", flush=True)
    cases.test_hostile_runtime_values_stay_in_bounds(SEED)
    print("case: hostile schedules (metadata for other lengths, arbitrary integers, int32 extremes)", flush=True)
    for _ in cases.hostile_metadata_problems(np.random.default_rng(SEED), 576):
        pass
    print("case: lengths near INT32_MAX (the scheduler's clip)", flush=True)
    cases.check_against_reference(cases.int32_extreme_lengths_problem(np.random.default_rng(SEED), s_q=2, h_q=16,
                                                                      head_dim=576), True, jnp.bfloat16)
    print("case: grid b2 s_q2 s_k140 h_q16 causal bf16", flush=True)
    cases.test_flashmla_grid(2, 2, 140, 16, 1, True, True, jnp.bfloat16, SEED)
    print("case: grid b2 s_q1 s_k140 h_q16 bf16", flush=True)  # 16 query rows: the narrow kernel's 16-wide form
    cases.test_flashmla_grid(2, 1, 140, 16, 1, True, False, jnp.bfloat16, SEED)
    print("case: grid b4 s_q1 s_k1024 h_q16 bf16 (split sequences)", flush=True)
    cases.test_flashmla_grid(4, 1, 1024, 16, 1, True, False, jnp.bfloat16, SEED)
    if not small:
        print("case: the rest", flush=True)
        cases.test_flashmla_grid(6, 4, 140, 64, 2, True, True, jnp.float16, SEED)
        cases.test_head_dim_512_and_all_empty(jnp.bfloat16, SEED)
        cases.test_metadata_kernel_matches_spec(SEED)
        cases.test_stacked_pool_reads_its_layer(576, jnp.bfloat16, SEED)
        print("case: hostile schedules, head dim 512 (the portable kernel)", flush=True)
        for _ in cases.hostile_metadata_problems(np.random.default_rng(SEED), 512):
            pass
    print("sanitize cases: every result checked matches the reference")


if __name__ == "__main__":
    main(small=len(sys.argv) > 1 and sys.argv[1] == "small")
