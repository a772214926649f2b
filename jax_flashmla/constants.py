"""Sizes fixed by the kernels' design; the CUDA side mirrors them in src/mla_params.h."""

PAGE_SIZE = 64  # tokens per KV-cache page, and the kernels' KV tile
MAX_PAGES_PER_SEQ = 2**24  # block_table columns: token positions (64 a page) stay below 2^30 in int32
BLOCK_M = 64  # query rows (s_q * heads per KV head) one kernel CTA serves
METADATA_ROW_INTS = 8  # ints per tile_scheduler_metadata row
SPLIT_OVERHEAD_BLOCKS = 5  # scheduler cost of a split's fixed work, in 64-token blocks: the seesaw's, and the most
                           # any schedule charges (the limits below assume it)
NARROW_MAX_QUERY_ROWS = 32  # head groups of at most this many query rows run the narrow kernel on Hopper
NARROW_SPLIT_OVERHEAD_BLOCKS = 2  # the narrow kernel's charge: its splits cost it less (benchmarks/NOTES.md, 2.22)
SCHEDULE_UNIT_LIMIT = 2**30  # the scheduler sums a batch's blocks and overheads in int32, up to this
MAX_SCHEDULED_BATCH = SCHEDULE_UNIT_LIMIT // (SPLIT_OVERHEAD_BLOCKS + 1)  # sequences: each counts one block at least
MAX_GRID_YZ = 65535  # CUDA's limit on a launch grid's y and z dimensions
MAX_SCHEDULE_PARTS = MAX_GRID_YZ  # tile_scheduler_metadata rows: the decode grid's z dimension
MAX_QUERY_ROWS = 8 * MAX_GRID_YZ  # s_q * h_q / h_kv: the combine grid's z dimension, 8 rows a CTA
DEFAULT_NUM_SMS = 132  # H100 SXM; used to size the schedule when no GPU is visible

SUPPORTED_HEAD_DIMS = (576, 512)  # latent KV (512) + decoupled rope (64), or latent alone
SUPPORTED_HEAD_DIM_V = 512
